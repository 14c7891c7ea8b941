"""Checks on values users pass in: numbers, devices and hosts (one place for each).

- `check_number(name, value, lo, hi, integer=False)`: a clear ValueError for a bool, nan, inf, a
  non-integer where one is wanted, or a value out of range. `bounded_int` / `bounded_float` are
  the same check as argparse types.
- `resolve_device(name)`: the device to run on, with one clear error for unknown or unavailable ones.
- `is_loopback(host)`: whether a bind address stays on this machine.
"""
from __future__ import annotations

import argparse
import math
import numbers
from typing import Optional


def resolve_device(name: Optional[str] = None):
    """torch.device for `name` (None: CUDA when available). ValueError for unknown/unavailable ones."""
    import torch  # configs import this module without needing torch
    if name is None or str(name).strip() == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} requested but MPS is not available on this machine")
        return dev
    raise ValueError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")


def number_problem(value, lo=None, hi=None, integer: bool = False) -> Optional[str]:
    """What is wrong with `value` as a number in [lo, hi] (an integer if `integer`), or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return "must be an integer" if integer else "must be a number"
    if not integer and not math.isfinite(value):
        return "must be a finite number"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            return f"must be in [{lo}, {hi}]"
        return f"must be >= {lo}" if lo is not None else f"must be <= {hi}"
    return None


def check_number(name: str, value, lo=None, hi=None, integer: bool = False):
    """`value` if it is a finite number in [lo, hi] (an integer, not a bool, if `integer`); else a
    ValueError naming `name`. The configs, the CLI's argparse types and the app all check with it."""
    problem = number_problem(value, lo, hi, integer)
    if problem is not None:
        raise ValueError(f"{name} {problem}, got {value!r}")
    return value


def _number(kind, lo, hi, text):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    problem = number_problem(v, lo, hi, integer=kind is int)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
    return v


def bounded_int(lo: Optional[int] = None, hi: Optional[int] = None):
    def parse(text):
        return _number(int, lo, hi, text)
    parse.__name__ = "int"
    return parse


def bounded_float(lo: Optional[float] = None, hi: Optional[float] = None):
    def parse(text):
        return _number(float, lo, hi, text)
    parse.__name__ = "float"
    return parse


def is_loopback(host: str) -> bool:
    import ipaddress
    h = (host or "").strip().strip("[]")
    if h in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
