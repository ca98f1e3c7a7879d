"""The one-cycle learning rate of 3D training, by steps and by the training time of a budget."""
import torch

from cryopick_plugin.engine.pick3d.schedule import OneCycle


def _optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1.0)


def test_step_driven_cycle_matches_torch_one_cycle():
    ours_opt, ref_opt = _optimizer(), _optimizer()
    ours = OneCycle(ours_opt, 2e-3, 200, pct_start=0.1, div_factor=30, final_div_factor=100)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=2e-3, total_steps=201, pct_start=0.1,
                                              anneal_strategy='cos', div_factor=30, final_div_factor=100,
                                              three_phase=False)
    lrs, ref_lrs = [ours.get_last_lr()[0]], [ref.get_last_lr()[0]]
    for _ in range(200):
        ours_opt.step()
        ours.step()
        ref_opt.step()
        ref.step()
        lrs.append(ours.get_last_lr()[0])
        ref_lrs.append(ref.get_last_lr()[0])
    # torch counts the warm-up in steps of (total - 1); ours in a progress share: same shape within a step
    assert abs(max(lrs) - 2e-3) < 1e-9 and abs(lrs[0] - 2e-3 / 30) < 1e-12
    assert abs(lrs[-1] - 2e-3 / 3000) < 1e-9
    # one step of the 20-step warm-up moves the rate by up to ~8 % of the peak
    assert max(abs(a - b) for a, b in zip(lrs, ref_lrs)) < 2e-3 * 0.06
    assert max(abs(a - b) for a, b in zip(lrs[40:], ref_lrs[40:])) < 2e-3 * 0.01


def test_time_driven_cycle_ends_at_the_bottom_when_the_window_ends():
    now = [0.0]
    opt = _optimizer()
    sched = OneCycle(opt, 1e-3, total_steps=10_000, clock=lambda: now[0])
    sched.set_window(0.0, 100.0)
    seen = []
    for second in range(0, 101, 5):
        now[0] = float(second)
        sched.step()
        seen.append(sched.get_last_lr()[0])
    # 21 steps of 10 000 planned: by steps alone the warm-up would not even be over
    assert abs(max(seen) - 1e-3) < 1e-4, 'the peak is reached at 10 % of the window'
    assert seen[-1] < 1e-3 / 2000, 'the end of the window is the end of the cycle'
    assert all(b <= a + 1e-15 for a, b in zip(seen[3:], seen[4:])), 'annealing only goes down'


def test_window_moves_and_resume_keeps_progress():
    now = [0.0]
    opt = _optimizer()
    sched = OneCycle(opt, 1e-3, total_steps=10_000, clock=lambda: now[0])
    sched.set_window(0.0, 100.0)
    now[0] = 50.0
    sched.step()
    halfway = sched.progress
    assert 0.45 < halfway < 0.55
    sched.set_window(0.0, 200.0)   # more time than estimated: progress never goes back
    sched.step()
    assert sched.progress == halfway
    state = sched.state_dict()
    again = OneCycle(_optimizer(), 1e-3, total_steps=10_000, clock=lambda: now[0])
    again.load_state_dict(state)
    assert again.get_last_lr() == sched.get_last_lr()
    again.set_window(50.0, 150.0)   # a resumed run: the new window covers the rest of the cycle
    now[0] = 150.0
    again.step()
    assert again.progress == 1.0
