"""Sanity checks that flag gradient masking (docs/protocol.md §8), read off an
:class:`~utils.evaluation.results.Evaluation`. Attacks are picked by their registered attributes
(what they see, their ε, steps, restarts), never by name, so a new attack on the final logits
joins the checks by itself.

Each check returns ``{"name", "status": "pass" | "FLAG" | "n/a", "numbers", "message"}``; a FLAG's
message says what it suggests, which figure to trust and which test found it. A FLAG needs evidence
beyond noise at this n: an exact one-sided test at level 0.05 (utils/evaluation/stats.py) on the
per-example results. Two attacks are compared by McNemar's exact test on the examples one broke and
the other left (the level divided by the number of comparisons a check makes, Bonferroni); a rate
by the exact binomial test. A cascade row saw only the survivors of earlier attacks, so comparisons
with it use the examples it received, where both attacks' outcomes are known.
"""
from utils.evaluation.stats import (
    BINOMIAL_TEST,
    LEVEL,
    MCNEMAR_NAME,
    MCNEMAR_TEST,
    binomial_upper_tail,
    mcnemar_exact,
)

UNBOUNDED_MAX_ACCURACY = 0.02
TRUST_WORST_CASE = "Trust the worst-case row, which includes the adaptive attacks, not this figure."
CASCADE_NA = "the attacks to compare ran in the cascade (survivors only); rerun with --no-cascade for this check."


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


def _known(attacker, defenders):
    return [d for d in defenders if d.standalone or d.order < attacker.order]


def broken_beyond(attacker, defenders, clean):
    """Examples ``attacker`` broke that every defender left standing — counted only against
    defenders known there (standalone, or run earlier in the cascade)."""
    known = _known(attacker, defenders)
    if not known:
        return None
    stood = clean.copy()
    for d in known:
        stood &= d.robust
    return int((stood & attacker.received & ~attacker.robust).sum())


def discordant(attacker, defenders, clean):
    """``(beyond, against)`` on the examples ``attacker`` received (where both sides are known):
    examples it broke that every known defender left, and examples it left that a known defender
    broke. None when no defender is known there."""
    beyond = broken_beyond(attacker, defenders, clean)
    if beyond is None:
        return None
    stood = clean.copy()
    for d in _known(attacker, defenders):
        stood &= d.robust
    against = int((clean & attacker.received & attacker.robust & ~stood).sum())
    return beyond, against


def evidence(more, fewer, comparisons=1):
    """``{"more", "fewer", "p", "level", "flag"}`` of the exact one-sided McNemar test that the side
    with ``more`` discordant examples is ahead, at LEVEL / ``comparisons`` (Bonferroni)."""
    p = mcnemar_exact(more, fewer)
    level = LEVEL / max(1, comparisons)
    return {"more": int(more), "fewer": int(fewer), "p": p, "level": level, "flag": more > fewer and p <= level}


def evidence_text(tests):
    """What the FLAG rests on: the test, its level and the counts of the deciding comparison."""
    worst = min(tests, key=lambda t: t["p"])
    level = f"level {LEVEL:g}" + (f"/{round(LEVEL / worst['level'])}" if worst["level"] < LEVEL else "")
    return (f"{MCNEMAR_NAME} at {level}: {worst['more']} examples against {worst['fewer']}, "
            f"p = {worst['p']:.2g}")


def _paired(weak, strong, clean):
    """``(examples strong left that weak broke, examples weak left that strong broke)`` on what both saw."""
    both = clean & weak.received & strong.received
    return int((both & strong.robust & ~weak.robust).sum()), int((both & weak.robust & ~strong.robust).sum())


def _weaker_beats(weak, strong, clean):
    """Counts of ``(examples weak broke that strong left, the other way)`` when knowable, else None."""
    if weak.standalone and strong.standalone:
        return _paired(weak, strong, clean)
    if not strong.standalone:
        return None
    return discordant(weak, [strong], clean)


def robust_not_above_clean(evaluation):
    """Accuracy under attack, counted the paper's way (last iterate, any clean prediction), ≤ clean."""
    clean = evaluation.clean_accuracy
    runs = [r for r in evaluation.results if r.paper_accuracy is not None and not r.reference]
    paper = {r.name: r.paper_accuracy for r in runs}
    numbers = {"clean": clean, "paper_last_iterate": paper,
               "robust_above_clean": [r.name for r in evaluation.results if (r.accuracy or 0) > clean]}
    if not paper:
        return _check("robust ≤ clean", "n/a", numbers, "no paper attack was run.")
    # examples right under attack but wrong clean, against examples right clean but wrong under attack
    tests = {r.name: evidence(int((r.paper & ~evaluation.clean).sum()), int((evaluation.clean & ~r.paper).sum()),
                              len(runs)) for r in runs}
    numbers["tests"] = tests
    above = {r.name: r.paper_accuracy for r in runs if tests[r.name]["flag"]}
    if above:
        listed = ", ".join(f"{name} {_pct(acc)}" for name, acc in above.items())
        return _check("robust ≤ clean", "FLAG", numbers,
                      f"accuracy under attack counted the paper's way ({listed}) exceeds clean accuracy "
                      f"{_pct(clean)} ({evidence_text([tests[n] for n in above])}): the attack turns misclassified "
                      f"inputs into correct ones, so its loss does not rise along its gradient, which suggests "
                      f"gradient masking. {TRUST_WORST_CASE}")
    return _check("robust ≤ clean", "pass", numbers,
                  f"no attack's accuracy is above clean accuracy {_pct(clean)} beyond noise (paper's count included; "
                  f"{MCNEMAR_TEST}).")


def _ladder_check(name, pairs, evaluation, flag_text, na_text):
    """FLAG when the attack with more effort in any pair (weak, strong) did worse beyond noise."""
    clean = evaluation.clean
    counts = {(a.name, b.name): _weaker_beats(a, b, clean) for a, b in pairs}
    comparable = {pair: c for pair, c in counts.items() if c is not None}
    numbers = {r.name: r.accuracy for pair in pairs for r in pair}
    if not comparable:
        return _check(name, "n/a", numbers, na_text if not pairs else CASCADE_NA)
    # the attack with more effort did worse: it left examples the weaker one broke
    tests = {pair: evidence(*c, len(comparable)) for pair, c in comparable.items()}
    numbers["tests"] = {f"{a} → {b}": t for (a, b), t in tests.items()}
    chain = ", ".join(f"{a} → {b}" for a, b in comparable)
    bad = [pair for pair, t in tests.items() if t["flag"]]
    if bad:
        listed = ", ".join(f"{a} → {b}" for a, b in bad)
        return _check(name, "FLAG", numbers,
                      f"{flag_text} ({listed}; {evidence_text([tests[p] for p in bad])}). {TRUST_WORST_CASE}")
    return _check(name, "pass", numbers, f"more effort never did worse beyond noise: {chain} ({MCNEMAR_TEST}).")


def more_effort_never_helps(evaluation):
    """PGD with more steps (same restarts) or more restarts (same steps) never raises accuracy."""
    ladder = sorted(_ce_pgd(evaluation), key=_effort)
    pairs = [(a, b) for a in ladder for b in ladder
             if a is not b and a.with_p == b.with_p and a.params.get("steps", 1) > 1
             and ((_effort(a)[1] == _effort(b)[1] and _effort(a)[0] < _effort(b)[0])
                  or (_effort(a)[0] == _effort(b)[0] and _effort(a)[1] < _effort(b)[1]))]
    return _ladder_check("more steps/restarts never help", pairs, evaluation,
                         "more PGD effort raised accuracy: the attack's progress is erratic, which suggests noisy or "
                         "uninformative gradients (gradient masking)",
                         "needs two final-logit PGDs that differ in steps or restarts (e.g. pgd10, pgd40, pgd100).")


def iterative_beats_single_step(evaluation):
    """Multi-step CE PGD is at least as strong as a one-step attack that sees the same outputs."""
    grads = [r for r in _threat(evaluation) if "steps" in r.params and r.params.get("loss") == "ce"
             and r.sees in ("final", "heads") and r.family in ("paper", "sanity")]
    single = [r for r in grads if r.params["steps"] == 1]
    multi = [r for r in grads if r.params["steps"] > 1 and r.params.get("restarts", 1) == 1]
    pairs = [(a, b) for a in single for b in multi if (a.with_p, a.sees) == (b.with_p, b.sees)]
    return _ladder_check("iterative beats single-step", pairs, evaluation,
                         "the iterative attack is weaker than one FGSM step: small steps get stuck, which suggests "
                         "a masked or shattered gradient", "needs fgsm and pgd40.")


def weaker_attacks_not_better(evaluation):
    """Black-box and transfer attacks never beat the white-box attacks on the final logits."""
    white = final_logit_gradient(evaluation)
    weaker = [r for r in _threat(evaluation) if r.sees in ("black-box", "transfer")]
    numbers = {"white_box": {r.name: r.accuracy for r in white}, "black_box_or_transfer":
               {r.name: r.accuracy for r in weaker}}
    if not white or not weaker:
        return _check("black-box/transfer never beat white-box", "n/a", numbers,
                      "needs a final-logit gradient attack and square or a transfer attack.")
    clean = evaluation.clean
    numbers["broken_only_by"] = {r.name: broken_beyond(r, white, clean) for r in weaker}
    if all(r.standalone for r in white + weaker):
        best = min(white, key=lambda r: r.accuracy)
        counts = {r.name: _paired(r, best, clean) for r in weaker}
        found = f"best gradient attack on the final logits ({best.name} {_pct(best.accuracy)})"
        describe = lambda r: f"{r.name} {_pct(r.accuracy)}"
    else:
        counts = {r.name: discordant(r, white, clean) for r in weaker}
        found = "every gradient attack on the final logits"
        describe = lambda r: f"{r.name} broke {numbers['broken_only_by'][r.name]} examples left by"
    counts = {name: c for name, c in counts.items() if c is not None}
    tests = {name: evidence(*c, len(counts)) for name, c in counts.items()}
    numbers["tests"] = tests
    beat = [r for r in weaker if r.name in tests and tests[r.name]["flag"]]
    if beat:
        listed = ", ".join(describe(r) for r in beat)
        return _check("black-box/transfer never beat white-box", "FLAG", numbers,
                      f"{listed} beat {found} although they use less information "
                      f"({evidence_text([tests[r.name] for r in beat])}): the final logits' gradient misleads the attack "
                      f"(gradient masking). {TRUST_WORST_CASE}")
    return _check("black-box/transfer never beat white-box", "pass", numbers,
                  f"no black-box or transfer attack beat {found} beyond noise ({MCNEMAR_TEST}).")


def unbounded_eps_reaches_zero(evaluation):
    """PGD with ε ≥ 1 (any image) on the final logits drives accuracy to about 0 %: FLAG when the
    accuracy is above UNBOUNDED_MAX_ACCURACY beyond noise (exact one-sided binomial test)."""
    runs = [r for r in evaluation.results if (r.eps or 0) >= 1 and r.sees == "final" and r.standalone]
    if not runs:
        return _check("ε = 1 reaches ~0 %", "n/a", {}, "needs pgd40-eps1.")
    result = runs[0]
    count, n = int(result.robust.sum()), evaluation.n
    p = binomial_upper_tail(count, n, UNBOUNDED_MAX_ACCURACY)
    numbers = {"attack": result.name, "accuracy": result.accuracy, "limit": UNBOUNDED_MAX_ACCURACY, "count": count,
               "n": n, "p": p, "level": LEVEL}
    if count > UNBOUNDED_MAX_ACCURACY * n and p <= LEVEL:
        return _check("ε = 1 reaches ~0 %", "FLAG", numbers,
                      f"PGD with ε = 1 still leaves {_pct(result.accuracy)} accuracy although any image is "
                      f"allowed ({BINOMIAL_TEST} against {_pct(UNBOUNDED_MAX_ACCURACY)}: {count} of {n}, p = {p:.2g}): "
                      f"the gradient does not lead anywhere (gradient masking). {TRUST_WORST_CASE}")
    return _check("ε = 1 reaches ~0 %", "pass", numbers,
                  f"accuracy {_pct(result.accuracy)}, not above {_pct(UNBOUNDED_MAX_ACCURACY)} beyond noise "
                  f"({BINOMIAL_TEST}; not in the worst case).")


def heads_agree_with_final(evaluation):
    """How often each auxiliary head's argmax equals the final prediction; FLAG when attacks that
    see the heads beat every attack on the final logits alone beyond noise."""
    if not evaluation.agreement:
        return _check("aux/final agreement", "n/a", {}, "plain model: no auxiliary heads.")
    final = [r for r in _threat(evaluation) if r.sees == "final"]
    heads = [r for r in _threat(evaluation) if r.sees == "heads"]
    agree = ", ".join(f"head {k} {_pct(v)}" for k, v in evaluation.agreement.items())
    numbers = {"agreement": evaluation.agreement, "final_logit_attacks": {r.name: r.accuracy for r in final},
               "head_aware_attacks": {r.name: r.accuracy for r in heads}}
    if not final or not heads:
        return _check("aux/final agreement", "pass", numbers, f"clean agreement with the final prediction: {agree}.")
    clean = evaluation.clean
    beyond = {r.name: broken_beyond(r, final, clean) for r in heads}
    numbers["broken_beyond_final"] = beyond
    if all(r.standalone for r in final + heads):
        best_final = min(final, key=lambda r: r.accuracy)
        best_head = min(heads, key=lambda r: r.accuracy)
        tests = {best_head.name: evidence(*_paired(best_head, best_final, clean))}
        detail = (f"{best_head.name} {_pct(best_head.accuracy)} vs {best_final.name} {_pct(best_final.accuracy)}")
    else:
        counts = {r.name: discordant(r, final, clean) for r in heads}
        counts = {name: c for name, c in counts.items() if c is not None}
        tests = {name: evidence(*c, len(counts)) for name, c in counts.items()}
        detail = "head-aware attacks broke " + ", ".join(f"{k}: {v}" for k, v in beyond.items() if v) + \
            " examples every final-logit attack left"
    numbers["tests"] = tests
    flagged = [t for t in tests.values() if t["flag"]]
    if flagged:
        return _check("aux/final agreement", "FLAG", numbers,
                      f"the final prediction agrees with the heads' argmax ({agree}), and attacks that see the heads "
                      f"beat every attack on the final logits ({detail}; {evidence_text(flagged)}): the argmax mask choice "
                      f"hides the heads from the final logits' gradient (gradient masking). {TRUST_WORST_CASE}")
    return _check("aux/final agreement", "pass", numbers,
                  f"clean agreement {agree}; head-aware attacks do not beat final-logit attacks beyond noise "
                  f"({MCNEMAR_TEST}).")


def autoattack_checks(evaluation):
    """AutoAttack's own checks (randomness, zero gradients, Square beating APGD, ...) on the
    AutoAttack runs, passed through. Warnings of the adaptive APGD/Square runs, whose
    surrogates may legitimately have flat losses, are listed in the report but not flagged."""
    runs = [r for r in evaluation.results if r.package_checks and r.n_received]
    if not runs:
        return _check("AutoAttack's own checks", "n/a", {}, "AutoAttack was not run on any example.")
    warnings = [f"{r.name}: {w}" for r in runs for w in r.warnings]
    if warnings:
        return _check("AutoAttack's own checks", "FLAG", {"warnings": warnings},
                      "the AutoAttack package warned: " + " | ".join(warnings)
                      + f" — its figure may be unreliable for this model. {TRUST_WORST_CASE}")
    return _check("AutoAttack's own checks", "pass", {"warnings": []}, "no warnings from the AutoAttack runs.")


def run_checks(evaluation):
    """All sanity checks, in report order."""
    return [
        robust_not_above_clean(evaluation),
        more_effort_never_helps(evaluation),
        iterative_beats_single_step(evaluation),
        weaker_attacks_not_better(evaluation),
        unbounded_eps_reaches_zero(evaluation),
        heads_agree_with_final(evaluation),
        autoattack_checks(evaluation),
    ]

