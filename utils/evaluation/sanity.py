"""Sanity checks that flag gradient masking (docs/protocol.md §8), read off an
:class:`~utils.evaluation.results.Evaluation`. Attacks are picked by their registered attributes
(what they see, their ε, steps, restarts), never by name, so a new attack on the final logits
joins the checks by itself.

Each check returns ``{"name", "status": "pass" | "FLAG" | "n/a", "numbers", "message"}``; a FLAG's
message says what it suggests and which figure to trust. Comparisons allow a tolerance of one
example or 0.5 %, whichever is larger. A cascade row saw only the survivors of earlier attacks,
so comparisons with it count the examples it broke that the other attack left standing.
"""
UNBOUNDED_MAX_ACCURACY = 0.02
TRUST_WORST_CASE = "Trust the worst-case row, which includes the adaptive attacks, not this figure."
CASCADE_NA = "the attacks to compare ran in the cascade (survivors only); rerun with --no-cascade for this check."


def tolerance(n):
    """One example or 0.5 %, whichever is larger."""
    return max(0.005, 1.0 / n) if n else 0.0


def _check(name, status, numbers, message):
    return {"name": name, "status": status, "numbers": numbers, "message": message}


def _pct(value):
    return f"{100 * value:.2f} %"


def _threat(evaluation):
    return [r for r in evaluation.results if r.in_worst_case]


def final_logit_gradient(evaluation):
    """Gradient attacks on the final logits alone at the threat model's ε."""
    return [r for r in _threat(evaluation) if r.sees == "final" and "steps" in r.params]


def _ce_pgd(evaluation):
    """Final-logit CE PGDs from a uniform start (the effort ladder)."""
    return [r for r in final_logit_gradient(evaluation)
            if r.params.get("loss") == "ce" and r.params.get("init") == "uniform"]


def _effort(r):
    return r.params.get("steps", 1), r.params.get("restarts", 1)


def broken_beyond(attacker, defenders, clean):
    """Examples ``attacker`` broke that every defender left standing — counted only against
    defenders known there (standalone, or run earlier in the cascade)."""
    known = [d for d in defenders if d.standalone or d.order < attacker.order]
    if not known:
        return None
    stood = clean.copy()
    for d in known:
        stood &= d.robust
    return int((stood & attacker.received & ~attacker.robust).sum())


def _weaker_beats(weak, strong, clean, tol, n):
    """Did the attack expected to be weaker do better than ``strong``? None when unknowable."""
    if weak.standalone and strong.standalone:
        return strong.accuracy > weak.accuracy + tol
    beyond = broken_beyond(weak, [strong], clean)
    return None if beyond is None or not strong.standalone else beyond > tol * n


def robust_not_above_clean(evaluation, tol):
    """Accuracy under attack, counted the paper's way (last iterate, any clean prediction), ≤ clean."""
    clean = evaluation.clean_accuracy
    paper = {r.name: r.paper_accuracy for r in evaluation.results if r.paper_accuracy is not None and not r.reference}
    numbers = {"clean": clean, "paper_last_iterate": paper,
               "robust_above_clean": [r.name for r in evaluation.results if (r.accuracy or 0) > clean]}
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


def _ladder_check(name, pairs, evaluation, tol, flag_text, na_text):
    """FLAG when the attack with more effort in any pair (weak, strong) did worse."""
    n, clean = evaluation.n, evaluation.clean
    verdicts = {(a.name, b.name): _weaker_beats(a, b, clean, tol, n) for a, b in pairs}
    comparable = {pair: v for pair, v in verdicts.items() if v is not None}
    numbers = {r.name: r.accuracy for pair in pairs for r in pair}
    if not comparable:
        return _check(name, "n/a", numbers, na_text if not pairs else CASCADE_NA)
    chain = ", ".join(f"{a} → {b}" for a, b in comparable)
    if any(comparable.values()):
        bad = ", ".join(f"{a} → {b}" for (a, b), v in comparable.items() if v)
        return _check(name, "FLAG", numbers, f"{flag_text} ({bad}). {TRUST_WORST_CASE}")
    return _check(name, "pass", numbers, f"more effort never did worse: {chain}.")


def more_effort_never_helps(evaluation, tol):
    """PGD with more steps (same restarts) or more restarts (same steps) never raises accuracy."""
    ladder = sorted(_ce_pgd(evaluation), key=_effort)
    pairs = [(a, b) for a in ladder for b in ladder
             if a is not b and a.with_p == b.with_p and a.params.get("steps", 1) > 1
             and ((_effort(a)[1] == _effort(b)[1] and _effort(a)[0] < _effort(b)[0])
                  or (_effort(a)[0] == _effort(b)[0] and _effort(a)[1] < _effort(b)[1]))]
    return _ladder_check("more steps/restarts never help", pairs, evaluation, tol,
                         "more PGD effort raised accuracy: the attack's progress is erratic, which suggests noisy or "
                         "uninformative gradients (gradient masking)",
                         "needs two final-logit PGDs that differ in steps or restarts (e.g. pgd10, pgd40, pgd100).")


def iterative_beats_single_step(evaluation, tol):
    """Multi-step CE PGD is at least as strong as a one-step attack that sees the same outputs."""
    grads = [r for r in _threat(evaluation) if "steps" in r.params and r.params.get("loss") == "ce"
             and r.sees in ("final", "heads") and r.family in ("paper", "sanity")]
    single = [r for r in grads if r.params["steps"] == 1]
    multi = [r for r in grads if r.params["steps"] > 1 and r.params.get("restarts", 1) == 1]
    pairs = [(a, b) for a in single for b in multi if (a.with_p, a.sees) == (b.with_p, b.sees)]
    return _ladder_check("iterative beats single-step", pairs, evaluation, tol,
                         "the iterative attack is weaker than one FGSM step: small steps get stuck, which suggests "
                         "a masked or shattered gradient", "needs fgsm and pgd40.")


def weaker_attacks_not_better(evaluation, tol):
    """Black-box and transfer attacks never beat the white-box attacks on the final logits."""
    white = final_logit_gradient(evaluation)
    weaker = [r for r in _threat(evaluation) if r.sees in ("black-box", "transfer")]
    numbers = {"white_box": {r.name: r.accuracy for r in white}, "black_box_or_transfer":
               {r.name: r.accuracy for r in weaker}}
    if not white or not weaker:
        return _check("black-box/transfer never beat white-box", "n/a", numbers,
                      "needs a final-logit gradient attack and square or a transfer attack.")
    numbers["broken_only_by"] = {r.name: broken_beyond(r, white, evaluation.clean) for r in weaker}
    if all(r.standalone for r in white + weaker):
        best = min(white, key=lambda r: r.accuracy)
        beat = [r for r in weaker if r.accuracy < best.accuracy - tol]
        found = f"best gradient attack on the final logits ({best.name} {_pct(best.accuracy)})"
        listed = ", ".join(f"{r.name} {_pct(r.accuracy)}" for r in beat)
    else:
        beat = [r for r in weaker if (numbers["broken_only_by"][r.name] or 0) > tol * evaluation.n]
        found = "every gradient attack on the final logits"
        listed = ", ".join(f"{r.name} broke {numbers['broken_only_by'][r.name]} examples left by" for r in beat)
    if beat:
        return _check("black-box/transfer never beat white-box", "FLAG", numbers,
                      f"{listed} beat {found} although they use less information: the final logits' gradient "
                      f"misleads the attack (gradient masking). {TRUST_WORST_CASE}")
    return _check("black-box/transfer never beat white-box", "pass", numbers,
                  f"no black-box or transfer attack beat {found}.")


def unbounded_eps_reaches_zero(evaluation, tol):
    """PGD with ε ≥ 1 (any image) on the final logits drives accuracy to about 0 %."""
    runs = [r for r in evaluation.results if (r.eps or 0) >= 1 and r.sees == "final" and r.standalone]
    if not runs:
        return _check("ε = 1 reaches ~0 %", "n/a", {}, "needs pgd40-eps1.")
    result = runs[0]
    limit = max(UNBOUNDED_MAX_ACCURACY, tol)
    numbers = {"attack": result.name, "accuracy": result.accuracy, "limit": limit}
    if result.accuracy > limit:
        return _check("ε = 1 reaches ~0 %", "FLAG", numbers,
                      f"PGD with ε = 1 still leaves {_pct(result.accuracy)} accuracy although any image is "
                      f"allowed: the gradient does not lead anywhere (gradient masking). {TRUST_WORST_CASE}")
    return _check("ε = 1 reaches ~0 %", "pass", numbers, f"accuracy {_pct(result.accuracy)} (not in the worst case).")


def heads_agree_with_final(evaluation, tol):
    """How often each auxiliary head's argmax equals the final prediction; FLAG when attacks that
    see the heads beat every attack on the final logits alone."""
    if not evaluation.agreement:
        return _check("aux/final agreement", "n/a", {}, "plain model: no auxiliary heads.")
    final = [r for r in _threat(evaluation) if r.sees == "final"]
    heads = [r for r in _threat(evaluation) if r.sees == "heads"]
    agree = ", ".join(f"head {k} {_pct(v)}" for k, v in evaluation.agreement.items())
    numbers = {"agreement": evaluation.agreement, "final_logit_attacks": {r.name: r.accuracy for r in final},
               "head_aware_attacks": {r.name: r.accuracy for r in heads}}
    if not final or not heads:
        return _check("aux/final agreement", "pass", numbers, f"clean agreement with the final prediction: {agree}.")
    beyond = {r.name: broken_beyond(r, final, evaluation.clean) for r in heads}
    numbers["broken_beyond_final"] = beyond
    if all(r.standalone for r in final + heads):
        best_final = min(final, key=lambda r: r.accuracy)
        best_head = min(heads, key=lambda r: r.accuracy)
        masked = best_head.accuracy < best_final.accuracy - tol
        detail = (f"{best_head.name} {_pct(best_head.accuracy)} vs {best_final.name} {_pct(best_final.accuracy)}")
    else:
        masked = sum(v or 0 for v in beyond.values()) > tol * evaluation.n
        detail = "head-aware attacks broke " + ", ".join(f"{k}: {v}" for k, v in beyond.items() if v) + \
            " examples every final-logit attack left"
    if masked:
        return _check("aux/final agreement", "FLAG", numbers,
                      f"the final prediction agrees with the heads' argmax ({agree}), and attacks that see the heads "
                      f"beat every attack on the final logits ({detail}): the argmax mask choice hides the heads from "
                      f"the final logits' gradient (gradient masking). {TRUST_WORST_CASE}")
    return _check("aux/final agreement", "pass", numbers,
                  f"clean agreement {agree}; head-aware attacks do not beat final-logit attacks.")


def autoattack_checks(evaluation):
    """AutoAttack's own checks (randomness, zero gradients, Square beating APGD, ...) on the
    AutoAttack runs, passed through. Warnings of the adaptive APGD/Square runs, whose
    surrogates may legitimately have flat losses, are listed in the report but not flagged."""
    runs = [r for r in evaluation.results if r.package_checks]
    if not runs:
        return _check("AutoAttack's own checks", "n/a", {}, "AutoAttack was not run.")
    warnings = [f"{r.name}: {w}" for r in runs for w in r.warnings]
    if warnings:
        return _check("AutoAttack's own checks", "FLAG", {"warnings": warnings},
                      "the AutoAttack package warned: " + " | ".join(warnings)
                      + f" — its figure may be unreliable for this model. {TRUST_WORST_CASE}")
    return _check("AutoAttack's own checks", "pass", {"warnings": []}, "no warnings from the AutoAttack runs.")


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

