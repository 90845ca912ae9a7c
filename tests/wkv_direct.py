"""A slow, literal implementation of rrwkv.md's WKV sums (float64), the oracle for the op's tests."""
import torch


def wkv_direct(time_decay, time_first, k, v, medium_decay=None, mk=None, mv=None, interval=0):
    """y_t = num_t / den_t with the three sums of rrwkv.md written out term by term (fresh state)."""
    B, T, C = k.shape
    ew = time_decay.exp()
    ewm = medium_decay.exp() if interval else None
    ys = []
    for t in range(T):
        logw, vals = [], []
        for i in range(t):
            logw.append(-(t - 1 - i) * ew + k[:, i])
            vals.append(v[:, i])
        logw.append(time_first + k[:, t])
        vals.append(v[:, t])
        if interval:
            j = t // interval
            for m in range(j):
                logw.append(-(j - 1 - m) * ewm + mk[:, m])
                vals.append(mv[:, m])
        lw = torch.stack(logw)
        e = torch.exp(lw - lw.max(0).values)
        ys.append((e * torch.stack(vals)).sum(0) / e.sum(0))
    return torch.stack(ys, 1)
