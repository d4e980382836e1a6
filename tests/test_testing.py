"""mmgpt.testing: the conformance checks pass on conforming components and catch the bugs
they exist for (each broken variant below must fail with its own message)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from mmgpt.projectors import MLPProjector
from mmgpt.registry import REGISTRY
from mmgpt.testing import (
    ConformanceError,
    build_example,
    check_decoder,
    check_encoder,
    check_entry,
    check_objective,
    check_projector,
    check_tokenizer,
    conformance_params,
)


class TinyImageEncoder(nn.Module):
    """4 patch tokens of an 8×8 RGB image."""

    modality = "image"

    def __init__(self, output_dim: int = 6) -> None:
        super().__init__()
        self.num_tokens = 4
        self.output_dim = output_dim
        self.patch = nn.Conv2d(3, output_dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(output_dim)

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        import numpy as np

        arrays = [np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) for im in items]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # (N, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.patch(x).flatten(2).transpose(1, 2))  # (N, 4, output_dim)

    def config_dict(self) -> dict[str, Any]:
        return {"output_dim": self.output_dim}


def test_check_encoder_accepts_a_conforming_encoder() -> None:
    encoder = TinyImageEncoder().train()
    check_encoder(encoder)
    assert encoder.training  # mode restored
    assert all(p.grad is None for p in encoder.parameters())  # no leftover gradients


class WrongTokenCount(TinyImageEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.num_tokens = 5


class BatchDependent(TinyImageEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out - out.mean(0, keepdim=True)  # normalises across the batch


class UnusedParameter(TinyImageEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 6)  # never called


class CachedWeights(TinyImageEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.cached = self.patch.weight.detach().clone()  # not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.conv2d(x, self.cached, self.patch.bias, stride=4)
        return self.norm(y.flatten(2).transpose(1, 2))


class LoadsTransposed(TinyImageEncoder):
    """Mixes its tokens with a square matrix that a buggy load hook transposes (a classic
    interop mistake with GPT-2's Conv1D weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self._register_load_state_dict_pre_hook(self._transpose)

    @staticmethod
    def _transpose(state: dict, prefix: str, *args: Any) -> None:
        state[prefix + "mix.weight"] = state[prefix + "mix.weight"].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(super().forward(x))


class FrozenWithCachedWeights(CachedWeights):
    """Frozen, so no gradient is expected; but its output ignores the saved weights."""

    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.conv2d(x, self.cached, stride=4)
        return y.flatten(2).transpose(1, 2)


class IntegerOutput(TinyImageEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).round().long()


class NonJSONConfig(TinyImageEncoder):
    def config_dict(self) -> dict[str, Any]:
        return {"dtype": torch.float32}


@pytest.mark.parametrize(
    ("encoder", "message"),
    [
        (WrongTokenCount(), r"expected output shape \(3, 5, 6\), got \(3, 4, 6\)"),
        (BatchDependent(), "depends on the other items of its batch"),
        (
            UnusedParameter(),
            r"does not reach trainable parameter\(s\) \['head.weight', 'head.bias'\]",
        ),
        # its real weight gets no gradient; and its output ignores the saved weights
        (CachedWeights(), r"does not reach trainable parameter\(s\) \['patch.weight'\]"),
        (LoadsTransposed(), "outputs differ after a save/load round trip"),
        (FrozenWithCachedWeights(), "does not change when the weights change"),
        (IntegerOutput(), "expected a floating-point output"),
        (NonJSONConfig(), "not JSON-serialisable"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_check_encoder_catches(encoder: nn.Module, message: str) -> None:
    with pytest.raises(ConformanceError, match=message):
        check_encoder(encoder)


def test_check_encoder_keeps_derived_buffers() -> None:
    class FixedTable(TinyImageEncoder):
        def __init__(self) -> None:
            super().__init__()
            # derived from the config, rebuilt by every instance: rightly not saved
            self.register_buffer("table", torch.linspace(0, 1, 6), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.table

    check_encoder(FixedTable())


def test_check_encoder_options() -> None:
    check_encoder(UnusedParameter(), allow_unused=["head."])
    frozen = UnusedParameter()
    frozen.head.requires_grad_(False)  # frozen parameters need no gradient
    check_encoder(frozen)
    check_encoder(TinyImageEncoder().requires_grad_(False))  # nor does a frozen encoder

    class Vectors(TinyImageEncoder):
        modality = "vector"

    with pytest.raises(ConformanceError, match="no default inputs for modality 'vector'"):
        check_encoder(Vectors())
    from PIL import Image

    check_encoder(Vectors(), items=[Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(2)])


# -- projectors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", conformance_params("projector"))
def test_registered_projectors_conform(name: str) -> None:
    check_entry("projector", name)


class LinearWithConfig(nn.Linear):
    def config_dict(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}


def test_check_projector_catches_a_wrong_width() -> None:
    class Lying(LinearWithConfig):
        in_dim, out_dim = 4, 5

    with pytest.raises(ConformanceError, match=r"expected output shape \(2, 3, 5\)"):
        check_projector(Lying(4, 3))

    class NoInputGradient(LinearWithConfig):
        in_dim, out_dim = 4, 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.detach())

    with pytest.raises(ConformanceError, match="no gradient flows back to the input"):
        check_projector(NoInputGradient(4, 3))


def test_check_projector_needs_a_config_dict() -> None:
    # MultimodalGPT.save_pretrained writes config_dict() into config.json
    class Unsaveable(nn.Linear):
        in_dim, out_dim = 4, 3

    with pytest.raises(
        ConformanceError, match=r"missing required attribute\(s\) \['config_dict'\]"
    ):
        check_projector(Unsaveable(4, 3))


class ForgetsDepth(MLPProjector):
    """Its config_dict() leaves out ``depth``: a saved model would rebuild it 2 layers deep."""

    def config_dict(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}

    @classmethod
    def conformance_example(cls) -> ForgetsDepth:
        return cls(in_dim=8, out_dim=6, depth=3)


class RenamesDepth(MLPProjector):
    """Its config_dict() names an argument the constructor does not take."""

    def config_dict(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "layers": self.depth}


@pytest.mark.parametrize(
    ("projector", "message"),
    [
        (ForgetsDepth, r"its weights do not fit the component rebuilt from config_dict\(\)"),
        (RenamesDepth, r"cannot be rebuilt from its config_dict\(\).*'layers'"),
    ],
    ids=["forgets-depth", "renames-depth"],
)
def test_check_entry_rebuilds_from_config_dict(projector: type, message: str) -> None:
    check_projector(projector(in_dim=8, out_dim=6, depth=3))  # fine on its own
    REGISTRY.register("projector", "_test-rebuild", projector)
    try:
        with pytest.raises(ConformanceError, match=message):
            check_entry("projector", "_test-rebuild")
    finally:
        REGISTRY.unregister("projector", "_test-rebuild")


# -- tokenizers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mmgpt_text import TextTokenizer, example_corpus_files

    return TextTokenizer.train(example_corpus_files(), vocab_size=320)


def test_check_tokenizer_accepts_the_bpe_tokenizer(tokenizer: Any) -> None:
    check_tokenizer(tokenizer)
    check_tokenizer(tokenizer, texts=["<image> and [IMG0] written literally", "a\r\nb"])


class Wrapped:
    """Delegates to a real tokenizer; subclasses break one promise each."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class LossyDecode(Wrapped):
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens).upper()


class PadIsEos(Wrapped):
    @property
    def pad_id(self) -> int:
        return self.inner.eos_id


class NoEos(Wrapped):
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.inner.encode(text, add_bos=add_bos)


@pytest.mark.parametrize(
    ("wrapper", "message"),
    [
        (LossyDecode, r"round trip is lossy: 'hello world' → \[.*\] → 'HELLO WORLD'"),
        (PadIsEos, r"special tokens share ids: \{\d+: \['eos_id', 'pad_id'\]\}"),
        (NoEos, r"add_bos=True, add_eos=True\) gave"),
    ],
)
def test_check_tokenizer_catches(tokenizer: Any, wrapper: type, message: str) -> None:
    with pytest.raises(ConformanceError, match=message):
        check_tokenizer(wrapper(tokenizer))


# -- decoders ------------------------------------------------------------------------------------
class TinyDecoder(nn.Module):
    """Regresses a 4×4 image from the conditioning tokens."""

    modality = "image"
    condition_dim = 5
    num_condition_tokens = 2
    image_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2 * 5, 3 * 4 * 4)

    def _predict(self, condition: torch.Tensor) -> torch.Tensor:
        return self.net(condition.flatten(1)).view(-1, 3, 4, 4)

    def training_loss(self, condition: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self._predict(condition), targets)

    def generate(self, condition: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._predict(condition).clamp(-1, 1)

    def config_dict(self) -> dict[str, Any]:
        return {}


def test_check_decoder() -> None:
    check_decoder(TinyDecoder())

    class Detached(TinyDecoder):
        def training_loss(self, condition: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return super().training_loss(condition.detach(), targets)

    with pytest.raises(ConformanceError, match="no gradient flows back to the input"):
        check_decoder(Detached())

    class OneImage(TinyDecoder):
        def generate(self, condition: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return super().generate(condition)[:1]

    with pytest.raises(ConformanceError, match="generate on 2 conditions returned 1 outputs"):
        check_decoder(OneImage())

    class MeanLoss(TinyDecoder):
        def training_loss(self, condition: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return (self._predict(condition) - targets).square().mean((1, 2, 3))  # per sample

    with pytest.raises(ConformanceError, match="must return a scalar tensor"):
        check_decoder(MeanLoss())


# -- objectives ----------------------------------------------------------------------------------
class TrainsItself:
    def __call__(self, model: Any, batch: Any) -> Any:
        raise NotImplementedError

    def build_trainer(
        self,
        model: Any,
        train_data: Any,
        config: Any,
        *,
        eval_data: Any = None,
        out_dir: Any,
        truncation: bool = False,
    ) -> Any:
        raise NotImplementedError


def test_check_objective() -> None:
    check_objective(TrainsItself())
    check_objective(lambda model, batch: None)

    class NoTruncation(TrainsItself):
        def build_trainer(  # type: ignore[override]
            self, model: Any, train_data: Any, config: Any, *, eval_data: Any = None, out_dir: Any
        ) -> Any:
            raise NotImplementedError

    with pytest.raises(ConformanceError, match="build_trainer must accept .*'truncation'"):
        check_objective(NoTruncation())

    class BatchOnly:
        def __call__(self, batch: Any) -> Any:
            raise NotImplementedError

    with pytest.raises(ConformanceError, match=r"cannot be called as objective\(model, batch\)"):
        check_objective(BatchOnly())
    with pytest.raises(ConformanceError, match=r"cannot be called as objective\(model, batch\)"):
        check_objective(TrainsItself)  # the class, not an instance: its call builds one


# -- over the registry -----------------------------------------------------------------------------
def test_conformance_params_and_build_example() -> None:
    params = conformance_params("projector")
    assert [p.id for p in params] == [f"projector:{n}" for n in REGISTRY.names("projector")]
    assert [p.values for p in params] == [(n,) for n in REGISTRY.names("projector")]
    with pytest.raises(ValueError, match="no conformance checks for kind 'metric'"):
        conformance_params("metric")

    class NeedsArguments(TinyImageEncoder):
        def __init__(self, output_dim: int) -> None:
            super().__init__(output_dim)

    REGISTRY.register("encoder", "_test-needs-arguments", NeedsArguments)
    try:
        with pytest.raises(
            ConformanceError, match="give the registered object a conformance_example"
        ):
            build_example("encoder", "_test-needs-arguments")
        NeedsArguments.conformance_example = staticmethod(lambda: NeedsArguments(3))
        encoder = build_example("encoder", "_test-needs-arguments")
        assert encoder.output_dim == 3
        check_entry("encoder", "_test-needs-arguments")
    finally:
        REGISTRY.unregister("encoder", "_test-needs-arguments")


# -- loaders -------------------------------------------------------------------------------
class _TextLoader:
    """A conforming loader of a made-up modality: a line of comma-separated numbers."""

    modality = "reading"
    extensions = (".reading",)

    def load(self, path):
        return torch.tensor([float(v) for v in path.read_text().split(",")])

    def example_items(self, n: int):
        return [torch.arange(3.0) + i for i in range(n)]

    def save(self, item, path):
        path = path.with_suffix(".reading")
        path.write_text(",".join(str(float(v)) for v in item))
        return path


class _AcceptsGarbage(_TextLoader):
    def load(self, path):
        return torch.zeros(3)  # never refuses a file


class _LossySave(_TextLoader):
    def save(self, item, path):
        return super().save(item + 1, path)


class _WrongSuffix(_TextLoader):
    def example_files(self, directory, n: int):
        (directory / "a.reading").write_text("1,2,3")
        return [directory / "a.reading"]

    def save(self, item, path):
        path = path.with_suffix(".txt")
        path.write_text("1,2,3")
        return path


def test_check_loader_accepts_a_conforming_loader_and_the_image_loader() -> None:
    from mmgpt.testing import check_entry, check_loader

    check_loader(_TextLoader())
    check_entry("loader", "image")


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        (_AcceptsGarbage(), "for a corrupt file instead of raising"),
        (_LossySave(), "does not load back as the same item"),
        (_WrongSuffix(), r"save\(\) must write a file with one of"),
    ],
)
def test_check_loader_catches(loader: Any, message: str) -> None:
    from mmgpt.testing import ConformanceError, check_loader

    with pytest.raises(ConformanceError, match=message):
        check_loader(loader)


def test_check_loader_needs_example_files_or_paths(tmp_path) -> None:
    from mmgpt.testing import ConformanceError, check_loader

    class NoExamples:
        modality = "reading"
        extensions = (".reading",)

        def load(self, path):
            return torch.tensor([float(v) for v in path.read_text().split(",")])

    with pytest.raises(ConformanceError, match="no example files"):
        check_loader(NoExamples())
    (tmp_path / "a.reading").write_text("1,2")
    check_loader(NoExamples(), [tmp_path / "a.reading"])
    with pytest.raises(ConformanceError, match="extensions must be"):
        bad = NoExamples()
        bad.extensions = ("READING",)
        check_loader(bad, [tmp_path / "a.reading"])
