"""The built-in architectures, registered with their default weight decay and input size
(docs/protocol.md §1) and how their foreign state dicts are recognised."""
from . import layouts
from .preact_resnet import PreActResNet
from .registry import register_arch
from .resnet import ResNet
from .wideresnet import WideResNet


def build_resnet18(num_classes, reverse_attention, image_size):
    """ResNet-18 (CIFAR stem); global pooling, so any input side works."""
    return ResNet((2, 2, 2, 2), num_classes, reverse_attention)


def build_preact_resnet18(num_classes, reverse_attention, image_size, separate_bn=False):
    """Our PreAct ResNet-18 (final BN+ReLU); ``image_size`` fixes the pooled grid of ``linear``."""
    return PreActResNet((2, 2, 2, 2), num_classes, reverse_attention, image_size, separate_bn=separate_bn)


def build_preact_resnet18_rb(num_classes, reverse_attention, image_size):
    """RobustBench's PreActResNet-18 (Wong2020Fast, ...), plain only."""
    return PreActResNet((2, 2, 2, 2), num_classes, reverse_attention, image_size, robustbench=True)


def build_wrn(num_classes, reverse_attention, image_size, depth, widen, separate_bn=False):
    """WRN-depth-widen in the TRADES layout."""
    return WideResNet(int(depth), int(widen), num_classes, reverse_attention, separate_bn=separate_bn)


register_arch("resnet18", build_resnet18, weight_decay=2e-4, input_size=32, infer=layouts.infer_resnet18)
register_arch("preact-resnet18", build_preact_resnet18, weight_decay=5e-4, input_size=64, options=("separate_bn",),
              infer=layouts.infer_preact, aliases=("preactresnet18",))
register_arch("preact-resnet18-rb", build_preact_resnet18_rb, weight_decay=5e-4, input_size=32, supports_ra=False,
              infer=layouts.infer_preact_rb)
register_arch("wrn-D-K", build_wrn, pattern=r"wrn-(\d+)-(\d+)", weight_decay=2e-4, input_size=32,
              options=("separate_bn",), infer=layouts.infer_wrn, example="wrn-34-10, wrn-28-10")
