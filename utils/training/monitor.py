"""The per-epoch robustness check of a training run: natural and PGD accuracy on a fixed subset
(the full attack suite of ``test_white_attack.py`` is :mod:`utils.evaluation`)."""
import torch

from utils.attacks import pgd
from utils.training.config import PAPER, TrainConfig

NOISE_SEED = 0  # every epoch's check starts PGD from the same noise


def monitor_accuracy(model, loader, config: TrainConfig = PAPER, reduce=None):
    """Natural and PGD accuracy of ``model`` over ``loader`` (eval mode, argmax RA masks).

    PGD-``config.eval_steps`` (CE, uniform start) at the run's ``eps`` and ``step_size``; the start
    noise comes from a generator seeded with :data:`NOISE_SEED`, so every epoch is attacked with the
    same noise and the global RNG (and with it resume) is untouched. ``config``'s ``amp`` and
    ``channels_last`` are the training run's autocast and memory format (the final evaluation,
    ``test_white_attack.py``, judges every example in fp32). ``reduce`` sums the counts of a sharded loader over
    ranks. Returns ``{"nat", "pgd", "size"}`` with accuracies in [0, 1].
    """
    was_training = model.training
    model.eval()
    generator = correct_nat = correct_pgd = None
    total = 0
    for x, y in loader:
        x = x.contiguous(memory_format=config.memory_format())
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(NOISE_SEED)
            correct_nat = torch.zeros((), device=x.device)
            correct_pgd = torch.zeros((), device=x.device)
        with config.autocast(x.device):
            with torch.no_grad():
                correct_nat += (model(x).argmax(1) == y).sum()
            x_adv = pgd(model, x, y, config.eps, config.step_size, config.eval_steps, loss="ce", init="uniform",
                        generator=generator)
            with torch.no_grad():
                correct_pgd += (model(x_adv).argmax(1) == y).sum()
        total += y.shape[0]
    model.train(was_training)
    if generator is None:  # an empty shard still joins the reduction
        correct_nat = correct_pgd = torch.zeros((), device=next(model.parameters()).device)
    counts = torch.stack([correct_nat, correct_pgd, torch.full_like(correct_nat, total)])
    if reduce is not None:
        counts = reduce(counts)
    nat, pgd_correct, total = counts.tolist()
    if total == 0:
        return {"nat": float("nan"), "pgd": float("nan"), "size": 0}
    return {"nat": nat / total, "pgd": pgd_correct / total, "size": int(total)}
