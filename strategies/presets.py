"""tokcomp's built-in schedule presets (`Schedule.preset`), registered through the ``tokcomp`` entry point
like a third-party plugin's (hook ``tokcomp_register_presets``).

Each preset is a function of the LLM's depth. Where its numbers come from is in its description. They live
next to the strategies they compose, so that the core (`tokcomp`) never imports a strategy:
`tokcomp.presets` and `tokcomp.Schedule.preset` find them through the plugin registry.
"""

from __future__ import annotations

from collections.abc import Callable

from tokcomp.hookspecs import hookimpl
from tokcomp.schedule import Schedule, Stage

from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .oim import OIM
from .pact import PACT
from .spu import SPU
from .visionzip import VisionZip
from .vscan import VScan
from .vtw import VTW

__all__ = ["PRESETS", "tokcomp_register_presets"]


def _spu(num_layers: int) -> Schedule:
    return Schedule([Stage(SPU(), site="llm", layers=range(min(2, num_layers - 1), num_layers))])


def _luvc_document(num_layers: int) -> Schedule:
    return Schedule([Stage(SPU(), site="llm", layers=range(num_layers // 2, num_layers))])


def _luvc(num_layers: int) -> Schedule:
    return Schedule([
        Stage(OIM(rate=0.25, iterations=2), site="encoder"),
        Stage(SPU(), site="llm", layers=range(min(2, num_layers - 1), num_layers)),
    ])


def _luvc_video(num_layers: int) -> Schedule:
    return Schedule([
        Stage(OIM(rate=0.25, iterations=4), site="encoder"),
        Stage(SPU(), site="llm", layers=range(min(2, num_layers - 1), num_layers)),
    ])


def _fastv(num_layers: int) -> Schedule:
    return Schedule([Stage(FastV(keep_ratio=0.5), site="llm", layers=[min(2, num_layers - 1)])])


def _pact(cutoff: float, keep: float) -> Callable[[int], Schedule]:
    def build(num_layers: int) -> Schedule:
        return Schedule([Stage(PACT(keep_ratio=keep, cutoff=cutoff), site="llm", layers=[min(4, num_layers - 1)])])

    return build


def _vtw(num_layers: int) -> Schedule:
    return Schedule([Stage(VTW(), site="llm", layers=[num_layers // 2])])


def _dart(num_layers: int) -> Schedule:
    return Schedule([Stage(DART(keep_ratio=0.111), site="llm", layers=[min(2, num_layers - 1)])])


def _divprune(num_layers: int) -> Schedule:
    return Schedule([Stage(DivPrune(keep_ratio=0.098), site="projector")])


def _cdpruner(num_layers: int) -> Schedule:
    return Schedule([Stage(CDPruner(keep_ratio=0.111), site="llm", layers=[0])])


def _visionzip(site: str) -> Callable[[int], Schedule]:
    def build(num_layers: int) -> Schedule:
        # 54 dominant + 10 contextual of LLaVA-1.5's 576 patches (the README's 64-token setting), as ratios so
        # that other towers keep the same fraction
        return Schedule([Stage(VisionZip(dominant_ratio=54 / 576, contextual_ratio=10 / 576), site=site)])

    return build


def _vscan(num_layers: int) -> Schedule:
    # the scripts' visual_token_num 96 (of LLaVA-1.5's 576), then image_token_list [32] at layer_list [16] of 32,
    # as fractions so that other towers and depths keep the same proportions
    return Schedule([
        Stage(VScan(keep_ratio=96 / 576), site="projector"),
        Stage(FastV(keep_ratio=32 / 96, query="last"), site="llm", layers=[num_layers // 2]),
    ])


PRESETS: dict[str, tuple[Callable[[int], Schedule], str]] = {
    "luvc": (_luvc, ("LUVC for images: OIM 2 iterations (width, height; rate 0.25) in the last third of the "
                    "encoder + SPU cascade from layer 2 (project's starting choice; paper's numbers unreadable)")),
    "luvc-video": (_luvc_video, ("LUVC for video: OIM 4 iterations at rate 0.25 (0.75^4: about 3x fewer tokens "
                                "after the encoder, 2.9-3.2x measured on Qwen2-VL frames of 32-64 patches a "
                                "side; not the 4x of the 8192->2048 regime) + SPU cascade from layer 2 "
                                "(project's starting choice)")),
    "spu": (_spu, "SPU linear cascade from layer 2 to zero visual tokens at the last layer (LUVC, LLM side)"),
    "luvc-document": (_luvc_document, "no OIM, SPU cascade from half depth (LUVC: documents/charts/OCR)"),
    "fastv": (_fastv, "FastV K=2, R=50% (the paper's headline setting)"),
    "pact": (_pact(0.21, 0.55), ("PACT at layer 4 with the reference's LLaVA-OneVision-7B defaults "
                                "(cutoff 0.21, keep 0.55; scripts/*.sh of orailix/PACT)")),
    "pact-qwen2-vl": (_pact(0.10, 0.80), ("PACT at layer 4 with the reference's Qwen2-VL-7B defaults "
                                         "(cutoff 0.10, keep 0.80)")),
    "vtw": (_vtw, "VTW at half depth (reference K=15/16 of 32 layers); use vtw.search_k for a model"),
    "dart": (_dart, ("DART at layer 2 with 4 + 4 pivots, 88.9% of the visual tokens pruned (the abstract's headline; "
                    "the reference's Qwen counting rule keeps 4 + 8 * int(n * 0.111 / 8))")),
    "divprune": (_divprune, "DivPrune on the projected tokens, ratio 0.098 (the reference's SUBSET_RATIO: 56 of 576)"),
    "visionzip": (_visionzip("encoder"), ("VisionZip at the last encoder block (LLaVA-1.5's feature layer), 54 dominant "
                                         "(CLS included) + 10 contextual of 576 patches: the README's 64-token "
                                         "setting, as fractions of the tower's patches; needs an encoder site that "
                                         "takes a 1-D token list (LLaVA)")),
    "visionzip-qwen": (_visionzip("projector"), ("VisionZip's Qwen port (llmc) at the projector: received attention "
                                                 "of the last encoder block, 54/576 dominant + 10/576 contextual of "
                                                 "each image's LLM tokens")),
    "vscan": (_vscan, ("VScan: local + global scan with merging at the projector keeping 96/576 of each image, then "
                      "FastV's last-token pruning at half depth keeping 32/96 (the reference scripts' "
                      "visual_token_num 96, layer_list [16], image_token_list [32], as fractions)")),
    "cdpruner": (_cdpruner, ("CDPruner on the LLM input, 11.1% per image (the reference's visual_token_num=64 of "
                            "LLaVA-1.5's 576; relevance from the LLM's prompt embeddings, tokcomp's adaptation)")),
}
"""The built-in presets: name -> (factory of the LLM depth, description with the numbers' source)."""


@hookimpl
def tokcomp_register_presets(register: Callable[..., None]) -> None:
    """Register the built-in presets."""
    for name, (factory, description) in PRESETS.items():
        register(name, factory, description)
