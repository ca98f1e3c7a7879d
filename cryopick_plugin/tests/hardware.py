"""What the machine running the tests can compute, for tests that depend on it.

Every test of a network's training or picking runs under both precisions on every machine (the
`precision` fixture in conftest.py): fp32 forced even where 'auto' would pick bf16 — the path of ordinary
CPUs and of most CI machines — and bf16. The bf16 case is skipped only where nothing computes bf16
natively (no oneDNN bf16 on the CPU, no CUDA device), with a reason starting 'hardware:', the one kind of
skip the repository's root conftest.py accepts under CI.
"""
PRECISIONS = ('fp32', 'bf16')
HARDWARE = 'hardware:'


def bf16_unavailable():
    """None where this machine computes bf16 natively, else the reason to skip a bf16 test."""
    import torch
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    except (AttributeError, RuntimeError):
        pass
    if torch.cuda.is_available():
        return None
    return f'{HARDWARE} no native bf16 here (oneDNN reports none for this CPU, and no CUDA device)'
