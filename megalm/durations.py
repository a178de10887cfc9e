"""Human-readable durations (the step line's ETA, preprocess progress); no torch, so data tools stay light."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """A short human duration for the step line's ETA: 45s, 12m05s, 3h07m, 2d04h."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
