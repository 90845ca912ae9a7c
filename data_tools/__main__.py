"""`python -m rrwkv.data_tools ...` (installed as `rrwkv-data ...` too): see rrwkv.data_tools.cli."""
import sys

from rrwkv.data_tools.cli import main

sys.argv[0] = "python -m rrwkv.data_tools"

sys.exit(main())
