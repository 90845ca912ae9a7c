# Source this at the start of every command on the lent GPU machine (from the project root there):
#   source benchmarks/on_device.sh && python -m pytest -q -m cuda tests/test_wkv_cuda.py
# It runs the device's own set-up (.whl/activate.sh, made by ../shared/device/wheels.sh, which must
# include setuptools) and installs this checkout as the `rrwkv` package (editable, no index, no
# dependencies: they come from .whl), since the project's modules import as rrwkv.*.
source .whl/activate.sh || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/rrwkv-install.log 2>&1 \
  || { cat /tmp/rrwkv-install.log >&2; echo "on_device.sh: installing the rrwkv package failed" >&2; return 1; }
