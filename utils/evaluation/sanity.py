"""Sanity checks that flag gradient masking (SPEC §8), read off an :class:`~utils.evaluation.Evaluation`.

Each check returns ``{"name", "status": "pass" | "FLAG" | "n/a", "numbers", "message"}``; a FLAG's
message says what it suggests and which figure to trust. Comparisons allow a tolerance of one
example or 0.5 %, whichever is larger, so sampling noise between attacks does not raise FLAGs.
"""

# Gradient attacks on the final logits only (the paper's "without p" white-box protocol).
FINAL_LOGIT_ATTACKS = ("fgsm", "pgd10", "pgd40", "pgd100", "pgd40-restarts", "cw40")
WEAKER_ATTACKS = ("square", "transfer-labelmask", "transfer-nora")
HEAD_AWARE_FAMILIES = ("aux-head", "joint", "straight-through", "enumeration")
UNBOUNDED_MAX_ACCURACY = 0.02
TRUST_WORST_CASE = "Trust the worst-case row, which includes the adaptive attacks, not this figure."


def tolerance(n):
    """One example or 0.5 %, whichever is larger."""
    return max(0.005, 1.0 / n) if n else 0.0


def _check(name, status, numbers, message):
    return {"name": name, "status": status, "numbers": numbers, "message": message}


def _pct(value):
    return f"{100 * value:.2f} %"


def _accuracies(evaluation, names):
    return {name: evaluation.result(name).accuracy for name in names if evaluation.result(name) is not None}


def robust_not_above_clean(evaluation, tol):
    """Accuracy under attack, counted the paper's way (last iterate, any clean prediction), ≤ clean."""
    clean = evaluation.clean_accuracy
    paper = {r.name: r.paper_accuracy for r in evaluation.results if r.paper_accuracy is not None}
    numbers = {"clean": clean, "paper_last_iterate": paper,
               "robust_above_clean": [r.name for r in evaluation.results if r.accuracy > clean]}
    if not paper:
        return _check("robust ≤ clean", "n/a", numbers, "no paper attack was run.")
    above = {name: acc for name, acc in paper.items() if acc > clean + tol}
    if above:
        listed = ", ".join(f"{name} {_pct(acc)}" for name, acc in above.items())
        return _check("robust ≤ clean", "FLAG", numbers,
                      f"accuracy under attack counted the paper's way ({listed}) exceeds clean accuracy "
                      f"{_pct(clean)}: the attack turns misclassified inputs into correct ones, so its loss does "
                      f"not rise along its gradient, which suggests gradient masking. {TRUST_WORST_CASE}")
    return _check("robust ≤ clean", "pass", numbers,
                  f"no attack's accuracy exceeds clean accuracy {_pct(clean)} (paper's count included).")


def more_effort_never_helps(evaluation, tol):
    """PGD 10 → 40 → 100 steps, and 1 → N restarts, never raise accuracy."""
    acc = _accuracies(evaluation, ("pgd10", "pgd40", "pgd100", "pgd40-restarts"))
    pairs = [(a, b) for a, b in (("pgd10", "pgd40"), ("pgd40", "pgd100"), ("pgd40", "pgd40-restarts"))
             if a in acc and b in acc]
    if not pairs:
        return _check("more steps/restarts never help", "n/a", acc,
                      "needs two of pgd10, pgd40, pgd100, pgd40-restarts.")
    worse = [(a, b) for a, b in pairs if acc[b] > acc[a] + tol]
    chain = ", ".join(f"{a} {_pct(acc[a])} → {b} {_pct(acc[b])}" for a, b in pairs)
    if worse:
        return _check("more steps/restarts never help", "FLAG", acc,
                      f"more PGD effort raised accuracy ({chain}): the attack's progress is erratic, which "
                      f"suggests noisy or uninformative gradients (gradient masking). {TRUST_WORST_CASE}")
    return _check("more steps/restarts never help", "pass", acc, chain + ".")


def iterative_beats_single_step(evaluation, tol):
    """PGD-40 is at least as strong as FGSM (with and without p)."""
    acc = _accuracies(evaluation, ("fgsm", "pgd40", "fgsm+p", "pgd40+p"))
    pairs = [(a, b) for a, b in (("fgsm", "pgd40"), ("fgsm+p", "pgd40+p")) if a in acc and b in acc]
    if not pairs:
        return _check("iterative beats single-step", "n/a", acc, "needs fgsm and pgd40.")
    chain = ", ".join(f"{b} {_pct(acc[b])} vs {a} {_pct(acc[a])}" for a, b in pairs)
    if any(acc[b] > acc[a] + tol for a, b in pairs):
        return _check("iterative beats single-step", "FLAG", acc,
                      f"the iterative attack is weaker than one FGSM step ({chain}): small steps get stuck, "
                      f"which suggests a masked or shattered gradient. {TRUST_WORST_CASE}")
    return _check("iterative beats single-step", "pass", acc, chain + ".")


def weaker_attacks_not_better(evaluation, tol):
    """Black-box (Square) and transfer attacks never beat the best white-box attack on the final logits."""
    white = _accuracies(evaluation, FINAL_LOGIT_ATTACKS)
    weaker = _accuracies(evaluation, WEAKER_ATTACKS)
    numbers = {"white_box": white, "black_box_or_transfer": weaker}
    if not white or not weaker:
        return _check("black-box/transfer never beat white-box", "n/a", numbers,
                      "needs a final-logit gradient attack and square or a transfer attack.")
    best_name = min(white, key=white.get)
    survived_white = evaluation.clean.copy()
    for name in white:
        survived_white &= evaluation.result(name).robust
    numbers["broken_only_by"] = {name: int((survived_white & ~evaluation.result(name).robust).sum()) for name in weaker}
    beat = {name: acc for name, acc in weaker.items() if acc < white[best_name] - tol}
    if beat:
        listed = ", ".join(f"{name} {_pct(acc)}" for name, acc in beat.items())
        return _check("black-box/transfer never beat white-box", "FLAG", numbers,
                      f"{listed} beat the best gradient attack on the final logits ({best_name} "
                      f"{_pct(white[best_name])}) although they use less information: the final logits' gradient "
                      f"misleads the attack (gradient masking). {TRUST_WORST_CASE}")
    return _check("black-box/transfer never beat white-box", "pass", numbers,
                  f"best white-box {best_name} {_pct(white[best_name])}; "
                  + ", ".join(f"{name} {_pct(acc)}" for name, acc in weaker.items()) + ".")


def unbounded_eps_reaches_zero(evaluation, tol):
    """PGD with ε = 1 (any image) drives accuracy to about 0 %."""
    result = evaluation.result("pgd40-eps1")
    if result is None:
        return _check("ε = 1 reaches ~0 %", "n/a", {}, "needs pgd40-eps1.")
    limit = max(UNBOUNDED_MAX_ACCURACY, tol)
    numbers = {"accuracy": result.accuracy, "limit": limit}
    if result.accuracy > limit:
        return _check("ε = 1 reaches ~0 %", "FLAG", numbers,
                      f"PGD with ε = 1 still leaves {_pct(result.accuracy)} accuracy although any image is "
                      f"allowed: the gradient does not lead anywhere (gradient masking). {TRUST_WORST_CASE}")
    return _check("ε = 1 reaches ~0 %", "pass", numbers, f"accuracy {_pct(result.accuracy)}.")


def heads_agree_with_final(evaluation, tol):
    """How often each auxiliary head's argmax equals the final prediction; FLAG when attacks that
    see the heads beat every attack on the final logits alone."""
    if not evaluation.agreement:
        return _check("aux/final agreement", "n/a", {}, "plain model: no auxiliary heads.")
    final = _accuracies(evaluation, FINAL_LOGIT_ATTACKS + ("autoattack",))
    heads = {r.name: r.accuracy for r in evaluation.results
             if r.family in HEAD_AWARE_FAMILIES or (r.family == "paper" and r.with_p)}
    agree = ", ".join(f"head {k} {_pct(v)}" for k, v in evaluation.agreement.items())
    numbers = {"agreement": evaluation.agreement, "final_logit_attacks": final, "head_aware_attacks": heads}
    if not final or not heads:
        return _check("aux/final agreement", "pass", numbers, f"clean agreement with the final prediction: {agree}.")
    best_final = min(final, key=final.get)
    best_head = min(heads, key=heads.get)
    if heads[best_head] < final[best_final] - tol:
        return _check("aux/final agreement", "FLAG", numbers,
                      f"the final prediction agrees with the heads' argmax ({agree}), and an attack that sees "
                      f"the heads ({best_head} {_pct(heads[best_head])}) beats every attack on the final logits "
                      f"({best_final} {_pct(final[best_final])}): the argmax mask choice hides the heads from the "
                      f"final logits' gradient (gradient masking). {TRUST_WORST_CASE}")
    return _check("aux/final agreement", "pass", numbers,
                  f"clean agreement {agree}; head-aware attacks ({best_head} {_pct(heads[best_head])}) do not beat "
                  f"final-logit attacks ({best_final} {_pct(final[best_final])}).")


def autoattack_checks(evaluation):
    """AutoAttack's own checks (randomness, zero gradients, Square beating APGD, ...) on the
    AutoAttack runs, passed through. Warnings of the adaptive APGD/Square runs, whose
    surrogates may legitimately have flat losses, are listed in the report but not flagged."""
    runs = [r for r in evaluation.results if r.name in ("autoattack", "autoattack+p")]
    if not runs:
        return _check("AutoAttack's own checks", "n/a", {}, "AutoAttack was not run.")
    warnings = [f"{r.name}: {w}" for r in runs for w in r.warnings]
    if warnings:
        return _check("AutoAttack's own checks", "FLAG", {"warnings": warnings},
                      "the AutoAttack package warned: " + " | ".join(warnings)
                      + f" — its figure may be unreliable for this model. {TRUST_WORST_CASE}")
    return _check("AutoAttack's own checks", "pass", {"warnings": []}, "no warnings.")


def run_checks(evaluation):
    """All sanity checks, in report order."""
    tol = tolerance(evaluation.n)
    return [
        robust_not_above_clean(evaluation, tol),
        more_effort_never_helps(evaluation, tol),
        iterative_beats_single_step(evaluation, tol),
        weaker_attacks_not_better(evaluation, tol),
        unbounded_eps_reaches_zero(evaluation, tol),
        heads_agree_with_final(evaluation, tol),
        autoattack_checks(evaluation),
    ]
