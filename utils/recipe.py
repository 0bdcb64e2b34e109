"""The paper's recipe constants, in one place (paper §4 and the protocol in docs/protocol.md).

Library code reads these names instead of repeating the numbers; command-line defaults and
dataclass defaults refer to them too, so a change here changes every default at once.
"""

EPS = 8 / 255                # L∞ radius of training and evaluation attacks (images in [0, 1])
STEP_SIZE = 0.007            # PGD step of the training attacks, the per-epoch check and PGD-40 / C&W-40
TRAIN_ATTACK_STEPS = 10      # PGD steps of the training attacks (AE and OE)
EVAL_STEPS = 20              # PGD steps of the per-epoch robustness check
AUX_WEIGHT = 2.0             # λ: weight of the reverse-attention heads in losses and "with p" attacks
ZETA = 3.0                   # ζ: weight of the ANC term
ALPHA = 1.0                  # α: ANC asymmetry (1 moves only the negative)
BETA = {"trades": 6.0, "mart": 5.0}  # β of each method's robust term
NEGATIVE_WARMUP_EPOCHS = 10  # non-random negative strategies use `random` for epochs <= this
START_NOISE = 0.001          # std of the Gaussian start x + 0.001·N(0, 1) of the training attacks
ATTACK_STEPS_PGD40 = 40      # steps of the paper's PGD-40 and C&W-40

# adaptive evaluation through the RA gate (docs/protocol.md §8)
JOINT_AUX_WEIGHTS = (0.5, 2.0, 8.0)   # aux-head weights of the joint (final + heads) attacks
ST_TAUS = (0.1, 1.0, 10.0)            # softmax temperatures of the straight-through attacks

# SGD schedule of the paper (120 epochs, lr x0.1 after epochs 75, 90, 100)
EPOCHS = 120
BATCH_SIZE = 128
LR = 0.01
MOMENTUM = 0.9
MILESTONES = (75, 90, 100)
LR_GAMMA = 0.1
TINY_IMAGENET_WEIGHT_DECAY = 5e-4  # the reference Tiny-ImageNet recipe, whatever the architecture
