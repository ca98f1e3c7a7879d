"""Progress of long loops a person can follow: steps done of the total, rate, ETA.

Training and picking run for minutes to hours; a console that says nothing for that long looks hung. A
`Progress` counts the steps of one loop (the batches of an epoch, the tiles of a tomogram, the
micrographs of a run) and writes one line at most every few seconds (`CRYOPICK_PROGRESS_SECONDS`,
default 10) through the `say` callable it is given — the engine module's logger or the `log` callable of
the function it serves — so the same lines reach the command line and, because Scipion protocols run the
`cryopick` commands as jobs, the protocol's log:

    epoch 3/30: 120/220 steps (55%), 1.30 s/step, ETA 2m10s; loss 0.412

Loops shorter than the interval stay silent; a loop that printed anything ends with a closing line.
`compute_summary` gives the line each long command starts with: the device and the arithmetic precision
it computes in (and why: asked, or chosen automatically), so a slow run on an ordinary CPU is explained
before it is slow.
"""
import logging
import math
import os
import time

EVERY_VAR = 'CRYOPICK_PROGRESS_SECONDS'
DEFAULT_EVERY = 10.0

logger = logging.getLogger(__name__)


def interval():
    """Seconds between two progress lines: $CRYOPICK_PROGRESS_SECONDS, else DEFAULT_EVERY."""
    value = os.environ.get(EVERY_VAR)
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            logger.warning('%s=%r is not a number of seconds; using %g', EVERY_VAR, value, DEFAULT_EVERY)
    return DEFAULT_EVERY


def duration(seconds):
    """'8.2 s', '45 s', '3m12s', '1h04m' — short enough for a progress line."""
    if seconds is None or not math.isfinite(seconds):
        return '?'
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f'{seconds:.1f} s'
    if seconds < 60:
        return f'{seconds:.0f} s'
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f'{m}m{s:02d}s'
    h, m = divmod(int(round(seconds / 60)), 60)
    return f'{h}h{m:02d}m'


def rate_text(done, elapsed, unit='step', units=None):
    """'1.30 s/step' for slow loops, '12.5 steps/s' for fast ones; '' before the first step."""
    if done <= 0 or elapsed <= 0:
        return ''
    per = elapsed / done
    if per >= 60:
        return f'{duration(per)}/{unit}'
    if per >= 1:
        return f'{per:.2f} s/{unit}'
    return f'{done / elapsed:.1f} {units or unit + "s"}/s'


class Progress:
    """Counts the steps of one loop and reports them, throttled to a line every `every` seconds.

    label   what the loop is ('epoch 3/30', 'tomo_01: network', 'picking')
    total   steps the loop will take (None or 0: unknown, no percentage nor ETA)
    unit    singular name of a step ('step', 'tile', 'micrograph'); `units` its plural (default unit + 's')
    say     callable(str) that writes a line (default: this module's logger at INFO)
    every   seconds between lines (default `interval()`); 0 writes a line at every step
    clock   time source (tests give a fake one)

    `update(n, note)` adds n steps; `note` (a string, or a callable returning one, evaluated only when a
    line is written) ends the line. `finish(note)` writes a closing line when the loop wrote any.
    """

    def __init__(self, label, total, unit='step', say=None, every=None, units=None, clock=time.monotonic):
        self.label = label
        self.total = int(total or 0)
        self.unit, self.units = unit, units or unit + 's'
        self.say = say or logger.info
        self.every = interval() if every is None else float(every)
        self.clock = clock
        self.start = self._last = clock()
        self.done = 0
        self.lines = 0

    @property
    def elapsed(self):
        return self.clock() - self.start

    @property
    def seconds_per_step(self):
        """Mean seconds per step so far (None before the first)."""
        return self.elapsed / self.done if self.done else None

    @property
    def eta(self):
        """Seconds left at the mean rate so far (None when unknown)."""
        if not self.done or not self.total:
            return None
        return max(0, self.total - self.done) * self.elapsed / self.done

    def line(self, note=None):
        """The progress line as it would be written now."""
        if callable(note):
            note = note()
        if self.total:
            parts = [f'{self.done}/{self.total} {self.units} ({100.0 * self.done / self.total:.0f}%)']
        else:
            parts = [f'{self.done} {self.units if self.done != 1 else self.unit}']
        rate = rate_text(self.done, self.elapsed, self.unit, self.units)
        if rate:
            parts.append(rate)
        if self.eta is not None:
            parts.append(f'ETA {duration(self.eta)}')
        text = f'{self.label}: ' + ', '.join(parts)
        return text + (f'; {note}' if note else '')

    def update(self, n=1, note=None):
        """Add `n` steps; write a line when `every` seconds passed since the last one. Returns self."""
        self.done += n
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self.lines += 1
            self.say(self.line(note))
        return self

    def finish(self, note=None):
        """Close the loop: one line with the steps done, the time taken and the mean rate, written only
        when the loop wrote progress lines (short loops stay silent)."""
        if not self.lines:
            return
        if callable(note):
            note = note()
        rate = rate_text(self.done, self.elapsed, self.unit, self.units)
        self.say(f'{self.label}: {self.done} {self.units if self.done != 1 else self.unit} in '
                 f'{duration(self.elapsed)}' + (f' ({rate})' if rate else '') + (f'; {note}' if note else ''))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.finish()
        return False


def compute_summary(device, precision=None, requested=None):
    """'device cpu (2 threads), precision fp32 (auto: no native bf16 on this CPU)'.

    device: the resolved device; precision: the resolved precision ('fp32' / 'bf16'; None: the network
    always runs fp32); requested: what was asked (None falls back to $CRYOPICK_PRECISION, then 'auto'), so
    the line says whether the precision was asked for or chosen.
    """
    import torch
    from .settings import PRECISION_VAR
    device = str(device)
    if device.startswith('cuda'):
        try:
            where = f'device {device} ({torch.cuda.get_device_name(torch.device(device))})'
        except (RuntimeError, AssertionError, ValueError):
            where = f'device {device}'
    else:
        n = torch.get_num_threads()
        where = f'device {device} ({n} thread{"s" if n != 1 else ""})'
    if precision is None:
        return f'{where}, precision fp32'
    asked = (requested or os.environ.get(PRECISION_VAR) or 'auto').strip().lower()
    if asked != 'auto':
        why = 'asked'
    elif precision == 'bf16':
        why = 'auto: native bf16 on this ' + ('GPU' if device.startswith('cuda') else 'CPU')
    else:
        why = 'auto: no native bf16 on this ' + ('GPU' if device.startswith('cuda') else 'CPU')
    return f'{where}, precision {precision} ({why})'
