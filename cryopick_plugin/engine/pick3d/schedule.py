"""The learning-rate schedule of 3D training: one cycle, driven by the training's progress.

A one-cycle schedule (cosine warm-up over the first 10 % from lr/30 to lr, cosine annealing to lr/3000)
normally follows the count of steps. With a time budget the count planned is rarely the count run: a run
cut by its budget halfway through a step-based cycle stops at a high learning rate, with noisy weights,
and its last validations are its worst. Here progress is the larger of the share of planned steps done
and, when a deadline is set, the share of the training window spent, so a budgeted run warms up, anneals
and ends at the bottom of the cycle whatever the speed of the machine — the schedule adapts to the
measured speed without having to predict it.
"""
import math
import time


class OneCycle:
    """Sets the learning rate of `optimizer`'s groups at each `step()`. Mirrors the parts of torch's
    schedulers that training uses (`step`, `state_dict`, `load_state_dict`, `get_last_lr`)."""

    def __init__(self, optimizer, max_lr, total_steps, pct_start=0.1, div_factor=30.0, final_div_factor=100.0,
                 constant=False, clock=time.monotonic):
        self.optimizer, self.max_lr, self.total = optimizer, float(max_lr), max(1, int(total_steps))
        self.pct_start, self.constant, self.clock = float(pct_start), bool(constant), clock
        self.initial_lr = self.max_lr / div_factor
        self.final_lr = self.initial_lr / final_div_factor
        self.n_step, self.progress = 0, 0.0
        self.window = None  # (clock at the start, clock at the end, progress at the start)
        self._apply()

    def lr_at(self, progress):
        """Learning rate at a progress in [0, 1]."""
        if self.constant:
            return self.max_lr
        p = min(max(progress, 0.0), 1.0)
        if p < self.pct_start:
            lo, hi, x = self.initial_lr, self.max_lr, p / self.pct_start
        else:
            lo, hi, x = self.max_lr, self.final_lr, (p - self.pct_start) / (1.0 - self.pct_start)
        return hi + (lo - hi) * (1.0 + math.cos(math.pi * x)) / 2.0

    def set_window(self, start, end):
        """Training time runs from `start` to `end` (on `clock`); the end may be moved as the estimate of the
        work after training changes. Progress already made (a resumed run) is kept: the window covers the rest."""
        if self.window is None:
            self.window = (float(start), float(end), self.progress)
        else:
            self.window = (self.window[0], float(end), self.window[2])

    def time_progress(self):
        if self.window is None:
            return 0.0
        start, end, base = self.window
        share = (self.clock() - start) / max(end - start, 1e-9)
        return base + (1.0 - base) * min(max(share, 0.0), 1.0)

    def step(self):
        self.n_step += 1
        self.progress = max(self.progress, min(1.0, max(self.n_step / self.total, self.time_progress())))
        self._apply()

    def _apply(self):
        lr = self.lr_at(self.progress)
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def get_last_lr(self):
        return [group['lr'] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {'n_step': self.n_step, 'progress': self.progress}

    def load_state_dict(self, state):
        self.n_step, self.progress = int(state['n_step']), float(state['progress'])
        self._apply()
