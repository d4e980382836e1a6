"""Conformance checks for registry entries, reusable by third-party plugins.

Each ``check_*`` function takes a built component and raises :class:`ConformanceError` (an
``AssertionError``, so pytest reports it as a failure) naming what is wrong. A plugin's test
suite can run them over its own entries::

    import pytest
    from mmgpt.testing import check_entry, conformance_params

    @pytest.mark.parametrize("name", conformance_params("encoder"))
    def test_encoder_conformance(name):
        check_entry("encoder", name)

``check_entry`` builds the entry with its ``conformance_example()`` hook when the registered
object has one (a class- or static method, or an attribute of a factory function, returning a
small instance), else with ``create(kind, name, **example_kwargs(kind))``: the small arguments
that mmgpt itself gives every entry of that kind (:data:`DEFAULT_KWARGS`). Components with
weights are then also rebuilt from their ``config_dict()``, as a model directory rebuilds them.
Inputs default per modality (``"image"``: small PIL images of several sizes and modes); a
component of another modality provides ``example_items(n)`` (encoders) or
``example_targets(n)`` (decoders), or the caller passes them.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgpt.files import load_tensors, save_tensors
from mmgpt.interfaces import ModalityDecoder, ModalityEncoder, Objective, Projector, Tokenizer
from mmgpt.registry import create, get, names
from mmgpt.weights import load_model_state, model_state_dict

__all__ = [
    "CHECKS",
    "DEFAULT_KWARGS",
    "EXAMPLE_CORPUS",
    "ConformanceError",
    "build_example",
    "check_decoder",
    "check_encoder",
    "check_entry",
    "check_loader",
    "check_objective",
    "check_projector",
    "check_rebuild",
    "check_tokenizer",
    "conformance_params",
    "example_kwargs",
]

DEFAULT_TEXTS = (
    "",
    "hello world",
    "  two  spaces,\ta tab\nand a new line\n",
    "unicode: café, naïve, 日本語, emoji 🙂",
    "numbers 12345 and punctuation!?",
)


class ConformanceError(AssertionError):
    """A component does not honour its plugin contract."""


def _fail(what: str, message: str) -> ConformanceError:
    return ConformanceError(f"{what}: {message}")


def _require(what: str, obj: Any, attributes: Iterable[str]) -> None:
    missing = [a for a in attributes if not hasattr(obj, a)]
    if missing:
        raise _fail(what, f"missing required attribute(s) {missing}")


def _positive_int(what: str, obj: Any, attribute: str) -> int:
    value = getattr(obj, attribute)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(what, f"{attribute} must be a positive int, got {value!r}")
    return value


def _check_config_dict(what: str, component: Any) -> None:
    # config_dict() is written into a model's config.json, so it must be JSON.
    config = component.config_dict()
    if not isinstance(config, dict):
        raise _fail(what, f"config_dict() must return a dict, got {type(config).__name__}")
    try:
        json.dumps(config)
    except TypeError as exc:
        raise _fail(what, f"config_dict() is not JSON-serialisable ({exc})") from None


def _check_tensor(what: str, out: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(out, torch.Tensor):
        raise _fail(what, f"expected a tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise _fail(what, f"expected output shape {shape}, got {tuple(out.shape)}")
    if not out.is_floating_point():
        raise _fail(what, f"expected a floating-point output, got {out.dtype}")
    if not bool(torch.isfinite(out).all()):
        raise _fail(what, "output has NaN or infinite values")


def _check_gradients(
    what: str, module: Any, loss: Any, allow_unused: Sequence[str] = (), inputs: Any = None
) -> None:
    """``loss.backward()`` must reach every trainable parameter (except ``allow_unused``)."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    try:
        loss.backward()
        if inputs is not None and (inputs.grad is None or not bool(inputs.grad.abs().sum() > 0)):
            raise _fail(
                what, "no gradient flows back to the input (it must, for end-to-end training)"
            )
        unused = [
            n
            for n, p in params.items()
            if (p.grad is None or not bool(torch.isfinite(p.grad).all()))
            and not any(n.startswith(prefix) for prefix in allow_unused)
        ]
        if unused:
            raise _fail(
                what,
                f"backward does not reach trainable parameter(s) {unused[:8]}"
                f"{'…' if len(unused) > 8 else ''} (or their gradient is not finite); freeze "
                "parameters the output does not use",
            )
        if params and not any(
            p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params.values()
        ):
            raise _fail(what, "every parameter gradient is zero")
    finally:
        for p in params.values():
            p.grad = None


def _random_weight(shape: tuple[int, ...], like: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(device=like.device, dtype=like.dtype)


def _check_state_round_trip(what: str, module: Any, forward: Callable[[Any], Any]) -> None:
    """Save the state dict through safetensors into a perturbed copy: outputs must be equal."""
    expected = forward(module)
    try:
        clone = copy.deepcopy(module)
    except Exception as exc:
        raise _fail(what, f"cannot be copied with copy.deepcopy ({exc})") from exc
    # Perturb what the state dict holds (aliases of the clone's tensors): non-persistent
    # buffers are derived from the config and must stay as they are.
    floating = [t for t in clone.state_dict().values() if t.is_floating_point()]
    with torch.no_grad():
        for t in floating:
            t.add_(_random_weight(tuple(t.shape), t) * 0.1 + 0.05)
    if floating and torch.equal(forward(clone), expected):
        raise _fail(
            what,
            "the output does not change when the weights change: forward does not use the "
            "module's parameters/buffers (a cached copy?), so saving them cannot restore it",
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_tensors(model_state_dict(module), path)
        try:
            load_model_state(clone, load_tensors(path), path)
        except ValueError as exc:
            raise _fail(what, f"state dict does not load back: {exc}") from exc
    if not torch.equal(forward(clone), expected):
        raise _fail(what, "outputs differ after a save/load round trip of the state dict")


# -- encoders ------------------------------------------------------------------------------
def _default_items(component: Any, hook: str, n: int) -> list[Any]:
    if hasattr(component, hook):
        return list(getattr(component, hook)(n))
    if getattr(component, "modality", None) == "image":
        rng = np.random.default_rng(0)
        sizes_modes = [((40, 30), "RGB"), ((24, 24), "RGB"), ((32, 48), "L")]
        images = []
        for (w, h), mode in sizes_modes[:n]:
            channels = 3 if mode == "RGB" else 1
            pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
            images.append(Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode))
        return images
    raise _fail(
        f"{type(component).__name__}",
        f"no default inputs for modality {getattr(component, 'modality', None)!r}; "
        f"define {hook}(n) or pass them explicitly",
    )


def check_encoder(
    encoder: ModalityEncoder,
    items: Sequence[Any] | None = None,
    *,
    allow_unused: Sequence[str] = (),
) -> None:
    """A :class:`~mmgpt.interfaces.ModalityEncoder`: declared sizes honoured, batch-independent,
    float output, gradients reach every trainable parameter, state round-trips through
    safetensors. ``allow_unused``: parameter-name prefixes exempt from the gradient check."""
    what = f"encoder {type(encoder).__name__}"
    _require(what, encoder, ("modality", "num_tokens", "output_dim", "preprocess", "config_dict"))
    if not isinstance(encoder, torch.nn.Module):
        raise _fail(what, "must be a torch.nn.Module")
    if not isinstance(encoder.modality, str) or not encoder.modality:
        raise _fail(what, f"modality must be a non-empty string, got {encoder.modality!r}")
    num_tokens = _positive_int(what, encoder, "num_tokens")
    output_dim = _positive_int(what, encoder, "output_dim")
    _check_config_dict(what, encoder)
    items = list(items) if items is not None else _default_items(encoder, "example_items", 3)
    n = len(items)

    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    try:
        inputs = encoder.preprocess(items).to(device)
        out = encoder(inputs)
        _check_tensor(what, out, (n, num_tokens, output_dim))
        alone = encoder(encoder.preprocess(items[:1]).to(device))
        if not torch.allclose(alone[0], out[0], atol=1e-5, rtol=1e-4):
            raise _fail(what, "an item's output depends on the other items of its batch")
        if any(p.requires_grad for p in encoder.parameters()):  # a frozen encoder needs none
            probe = _random_weight(tuple(out.shape), out)
            _check_gradients(what, encoder, (out * probe).sum(), allow_unused)
        with torch.no_grad():
            _check_state_round_trip(what, encoder, lambda m: m(inputs))
    finally:
        encoder.train(was_training)


# -- projectors ----------------------------------------------------------------------------
def check_projector(projector: Projector, *, allow_unused: Sequence[str] = ()) -> None:
    """A :class:`~mmgpt.interfaces.Projector`: ``(…, in_dim) → (…, out_dim)`` for any leading
    shape, float output, gradients to input and parameters, JSON ``config_dict()``,
    safetensors round trip.

    A projector that mixes the token axis (an output projector from signal tokens to decoder
    conditions) declares ``num_signal_tokens`` (and ``num_condition_tokens``, default the
    same): it maps ``(B, num_signal_tokens, in_dim) → (B, num_condition_tokens, out_dim)``."""
    what = f"projector {type(projector).__name__}"
    _require(what, projector, ("in_dim", "out_dim", "config_dict"))
    if not isinstance(projector, torch.nn.Module):
        raise _fail(what, "must be a torch.nn.Module")
    _check_config_dict(what, projector)
    in_dim = _positive_int(what, projector, "in_dim")
    out_dim = _positive_int(what, projector, "out_dim")
    param = next(projector.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = projector.training
    projector.eval()
    signal_tokens = getattr(projector, "num_signal_tokens", None)
    if signal_tokens is None:
        cases = [((2, 3), (2, 3)), ((4,), (4,))]  # (input, output) leading shapes
    else:
        tokens_in = _positive_int(what, projector, "num_signal_tokens")
        tokens_out = getattr(projector, "num_condition_tokens", None) or tokens_in
        cases = [((2, tokens_in), (2, tokens_out)), ((1, tokens_in), (1, tokens_out))]
    try:
        for lead_in, lead_out in cases:
            x = torch.randn(*lead_in, in_dim, generator=torch.Generator().manual_seed(0))
            _check_tensor(what, projector(x.to(device)), (*lead_out, out_dim))
        x = torch.randn(*cases[0][0], in_dim, generator=torch.Generator().manual_seed(1))
        x = x.to(device)
        x.requires_grad_(True)
        out = projector(x)
        probe = _random_weight(tuple(out.shape), out)
        _check_gradients(what, projector, (out * probe).sum(), allow_unused, inputs=x)
        x = x.detach()
        with torch.no_grad():
            _check_state_round_trip(what, projector, lambda m: m(x))
    finally:
        projector.train(was_training)


# -- tokenizers ----------------------------------------------------------------------------
def check_tokenizer(tokenizer: Tokenizer, texts: Sequence[str] = DEFAULT_TEXTS) -> None:
    """A :class:`~mmgpt.interfaces.Tokenizer`: lossless ``decode(encode(s)) == s``, distinct
    in-range special ids (bos may equal eos), ``add_bos``/``add_eos`` and ``skip_special_tokens`` honoured,
    ``"<image>"`` encodes to ``image_token_id``, ``save`` + ``from_file`` round trip."""
    what = f"tokenizer {type(tokenizer).__name__}"
    _require(
        what,
        tokenizer,
        ("vocab_size", "bos_id", "eos_id", "pad_id", "encode", "decode", "token_to_id", "save"),
    )
    vocab = _positive_int(what, tokenizer, "vocab_size")
    special = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    if getattr(tokenizer, "image_token_id", None) is not None:
        special["image_token_id"] = tokenizer.image_token_id
    for i, token_id in enumerate(getattr(tokenizer, "signal_token_ids", None) or []):
        special[f"signal_token_ids[{i}]"] = token_id
    for name, token_id in special.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise _fail(what, f"{name} must be an int, got {token_id!r}")
        if not 0 <= token_id < vocab:
            raise _fail(what, f"{name}={token_id} is outside the vocabulary [0, {vocab})")
    by_id: dict[int, list[str]] = {}
    for name, token_id in special.items():
        by_id.setdefault(token_id, []).append(name)
    # bos and eos may be one token (GPT-2's <|endoftext|>); any other sharing is a bug
    shared = {i: n for i, n in by_id.items() if len(n) > 1 and sorted(n) != ["bos_id", "eos_id"]}
    if shared:
        raise _fail(what, f"special tokens share ids: {shared}")

    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    for text in texts:
        ids = tokenizer.encode(text)
        if not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise _fail(what, f"encode({text!r}) returned ids outside [0, {vocab}): {ids}")
        decoded = tokenizer.decode(ids)
        if decoded != text:
            raise _fail(what, f"round trip is lossy: {text!r} → {ids} → {decoded!r}")
        framed = tokenizer.encode(text, add_bos=True, add_eos=True)
        if framed != [bos, *ids, eos]:
            raise _fail(what, f"encode({text!r}, add_bos=True, add_eos=True) gave {framed}")
        # (a text may itself spell special tokens, which skipping drops too)
        skipped = tokenizer.decode(framed, skip_special_tokens=True)
        if skipped != tokenizer.decode(ids, skip_special_tokens=True):
            raise _fail(what, f"decode(..., skip_special_tokens=True) keeps bos/eos of {text!r}")
    if "image_token_id" in special and tokenizer.encode("<image>") != [tokenizer.image_token_id]:
        raise _fail(what, f"'<image>' must encode to [{tokenizer.image_token_id}]")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        if not any(Path(tmp).iterdir()):
            raise _fail(what, "save(directory) wrote nothing")
        loader = getattr(type(tokenizer), "from_file", None)
        if loader is not None:
            reloaded = loader(tmp)
            for text in texts:
                if reloaded.encode(text) != tokenizer.encode(text):
                    raise _fail(
                        what, f"a saved and reloaded tokenizer encodes {text!r} differently"
                    )
            for name, token_id in special.items():
                if name.startswith("signal"):
                    continue
                if getattr(reloaded, name) != token_id:
                    raise _fail(what, f"{name} changes after save/from_file")
            if reloaded.vocab_size != vocab:
                raise _fail(what, "vocab_size changes after save/from_file")


# -- decoders ------------------------------------------------------------------------------
def check_decoder(
    decoder: ModalityDecoder,
    targets: Any = None,
    *,
    generate_kwargs: dict[str, Any] | None = None,
    allow_unused: Sequence[str] = (),
) -> None:
    """A :class:`~mmgpt.interfaces.ModalityDecoder`: ``training_loss`` is a finite scalar whose
    gradient reaches the condition and the trainable parameters; ``generate`` returns one output
    per condition; the state dict round-trips through safetensors.

    ``targets`` default: ``decoder.example_targets(2)``, else for ``"image"`` decoders random
    images in [-1, 1] of ``decoder.image_size`` (default 32) with ``decoder.in_channels`` (3).
    """
    what = f"decoder {type(decoder).__name__}"
    _require(
        what,
        decoder,
        ("modality", "condition_dim", "num_condition_tokens", "training_loss", "generate"),
    )
    if not isinstance(decoder, torch.nn.Module):
        raise _fail(what, "must be a torch.nn.Module")
    _check_config_dict(what, decoder)
    dim = _positive_int(what, decoder, "condition_dim")
    tokens = _positive_int(what, decoder, "num_condition_tokens")
    if targets is None:
        if hasattr(decoder, "example_targets"):
            targets = decoder.example_targets(2)
        elif decoder.modality == "image":
            size = getattr(decoder, "image_size", 32)
            channels = getattr(decoder, "in_channels", 3)
            g = torch.Generator().manual_seed(0)
            targets = torch.rand(2, channels, size, size, generator=g) * 2 - 1
        else:
            raise _fail(what, "no default targets: define example_targets(n) or pass targets")
    param = next(decoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(targets, torch.Tensor):
        targets = targets.to(device)
    condition = torch.randn(2, tokens, dim, generator=torch.Generator().manual_seed(0))
    condition = condition.to(device).requires_grad_(True)

    loss = decoder.training_loss(condition, targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise _fail(what, f"training_loss must return a scalar tensor, got {loss!r:.80}")
    if not loss.is_floating_point() or not math.isfinite(loss.item()):
        raise _fail(what, f"training_loss is not a finite float: {loss.item()}")
    if not loss.requires_grad:
        raise _fail(what, "training_loss has no gradient")
    _check_gradients(what, decoder, loss, allow_unused, inputs=condition)

    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            out = decoder.generate(condition.detach(), **(generate_kwargs or {}))
    finally:
        decoder.train(was_training)
    count = out.shape[0] if isinstance(out, torch.Tensor) else len(out)
    if count != 2:
        raise _fail(what, f"generate on 2 conditions returned {count} outputs")

    def state_of(module: Any) -> Any:
        # generation is stochastic; compare the weights themselves through a stable sum
        return torch.stack([p.detach().double().sum() for p in module.state_dict().values()])

    with torch.no_grad():
        _check_state_round_trip(what, decoder, state_of)


# -- loaders -------------------------------------------------------------------------------
def _same_item(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_item(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_item(a[k], b[k]) for k in a)
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):
        return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, (torch.Tensor, np.ndarray)) and isinstance(b, (torch.Tensor, np.ndarray)):
        x, y = (
            torch.as_tensor(np.asarray(a), dtype=torch.float64),
            torch.as_tensor(np.asarray(b), dtype=torch.float64),
        )
        # lossy-but-fine encodings (16-bit PCM audio) round within 1e-3 of full scale
        return x.shape == y.shape and bool(torch.allclose(x, y, atol=1e-3, rtol=1e-3))
    return a == b


def _example_files(loader: Any, directory: Path) -> list[Path]:
    if hasattr(loader, "example_files"):
        return [Path(p) for p in loader.example_files(directory, 2)]
    if loader.modality == "image":
        paths = []
        for i, item in enumerate(_default_items(loader, "example_items", 2)):
            paths.append(directory / f"example{i}.png")
            item.save(paths[-1])
        return paths
    if hasattr(loader, "example_items") and callable(getattr(loader, "save", None)):
        return [
            Path(loader.save(item, directory / f"example{i}"))
            for i, item in enumerate(loader.example_items(2))
        ]
    raise _fail(
        f"loader {type(loader).__name__}",
        "no example files: define example_files(directory, n) (or example_items(n) with save) "
        "or pass paths",
    )


def check_loader(loader: Any, paths: Sequence[str | Path] | None = None) -> None:
    """A :class:`~mmgpt.interfaces.ModalityLoader`: a modality name, lower-case dotted
    ``extensions``, a ``<...>`` placeholder; ``load`` reads every example file through
    :func:`mmgpt.data.loaders.load_input` (the door every reader uses) and refuses a corrupt
    file with an exception instead of returning an item; ``save``, when present, writes a file
    with one of the loader's extensions that loads back as the same item.

    ``paths`` default: ``loader.example_files(directory, n)``, else ``example_items(n)``
    written with ``save``, else small PNGs for ``"image"``."""
    from mmgpt.data.loaders import InputLoadError, load_input  # the data layer's door

    what = f"loader {type(loader).__name__}"
    _require(what, loader, ("modality", "extensions", "load"))
    modality = loader.modality
    if not isinstance(modality, str) or not modality:
        raise _fail(what, f"modality must be a non-empty string, got {modality!r}")
    exts = loader.extensions
    if (
        isinstance(exts, str)
        or not exts
        or not all(isinstance(e, str) and e.startswith(".") and e == e.lower() for e in exts)
    ):
        raise _fail(what, f"extensions must be a tuple of lower-case '.ext' strings, got {exts!r}")
    placeholder = getattr(loader, "placeholder", None)
    if placeholder is not None and not (
        isinstance(placeholder, str) and placeholder.startswith("<") and placeholder.endswith(">")
    ):
        raise _fail(what, f"placeholder must look like '<{modality}>', got {placeholder!r}")
    limit = getattr(loader, "max_bytes", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _fail(what, f"max_bytes must be a positive integer or None, got {limit!r}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        files = [Path(p) for p in paths] if paths is not None else _example_files(loader, directory)
        if not files:
            raise _fail(what, "no example files to load")
        items = []
        for path in files:
            try:
                items.append(load_input(modality, path, loader=loader))
            except InputLoadError as exc:
                raise _fail(what, f"cannot load its example file {path}: {exc}") from exc
            if items[-1] is None:
                raise _fail(what, f"load({path}) returned None")
        junk = directory / f"corrupt{exts[0]}"
        junk.write_bytes(b"\x00\x01 this is not a valid file \xff" * 4)
        try:
            got = loader.load(junk)
        except Exception:
            pass  # refused: what a loader must do
        else:
            raise _fail(
                what,
                f"load() returned {type(got).__name__} for a corrupt file instead of raising: "
                "a dataset would train on garbage",
            )
        save = getattr(loader, "save", None)
        if callable(save):
            written = Path(save(items[0], directory / "saved"))
            if written.suffix.lower() not in exts or not written.is_file():
                raise _fail(
                    what,
                    f"save() must write a file with one of {exts} and return it, got {written}",
                )
            again = load_input(modality, written, loader=loader)
            if not _same_item(items[0], again):
                raise _fail(what, "an item written by save() does not load back as the same item")


# -- objectives ----------------------------------------------------------------------------
def check_objective(objective: Objective) -> None:
    """An :class:`~mmgpt.interfaces.Objective`: callable as ``objective(model, batch)``; one
    that builds its own trainer (:class:`~mmgpt.interfaces.BuildsTrainer`) accepts the
    arguments ``mmgpt train`` passes to ``build_trainer``. The loss itself needs the model and
    batches of the objective's own kind, so its tests check it."""
    what = f"objective {type(objective).__name__}"
    try:
        inspect.signature(objective).bind(None, None)
    except (TypeError, ValueError) as exc:  # not callable, or another signature
        raise _fail(what, f"cannot be called as objective(model, batch) ({exc})") from None
    build_trainer = getattr(objective, "build_trainer", None)
    if build_trainer is None:
        return
    try:
        # exactly the call of mmgpt.recipe for an objective with build_trainer
        inspect.signature(build_trainer).bind(
            None, None, None, eval_data=None, out_dir="out", truncation=False
        )
    except (TypeError, ValueError) as exc:
        raise _fail(
            what,
            "build_trainer must accept (model, train_data, config, *, eval_data, out_dir, "
            f"truncation), as `mmgpt train` calls it ({exc})",
        ) from None


# -- over the registry ---------------------------------------------------------------------
CHECKS: dict[str, Callable[..., None]] = {
    "encoder": check_encoder,
    "projector": check_projector,
    "tokenizer": check_tokenizer,
    "decoder": check_decoder,
    "objective": check_objective,
    "loader": check_loader,
}

# The small English corpus shipped with mmgpt (mmgpt/assets/corpus).
EXAMPLE_CORPUS = sorted(str(p) for p in (Path(__file__).parent / "assets" / "corpus").glob("*.txt"))

# Small values of the arguments that mmgpt itself passes to every entry of a kind, so any entry
# can be built with them: MultimodalGPT.build gives a projector in_dim/out_dim, and a recipe's
# tokenizer section trains a tokenizer with files= (the run's text) and its vocab_size.
DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "projector": {"in_dim": 8, "out_dim": 6},
    "tokenizer": {"files": EXAMPLE_CORPUS, "vocab_size": 320},
}


def _checked_kind(kind: str) -> str:
    if kind not in CHECKS:
        raise ValueError(f"no conformance checks for kind {kind!r}; kinds: {', '.join(CHECKS)}")
    return kind


def conformance_params(kind: str) -> list[Any]:
    """Every registered name of ``kind`` as a ``pytest.param`` with id ``kind:name``."""
    import pytest  # deferred: a test-only dependency, needed by this helper alone

    return [pytest.param(name, id=f"{kind}:{name}") for name in names(_checked_kind(kind))]


def example_kwargs(kind: str) -> dict[str, Any]:
    """The small arguments :func:`build_example` gives an entry of ``kind`` that has no
    ``conformance_example()`` (a fresh copy of :data:`DEFAULT_KWARGS`; ``{}`` for most kinds).
    """
    return copy.deepcopy(DEFAULT_KWARGS.get(_checked_kind(kind), {}))


def build_example(kind: str, name: str) -> Any:
    """A small instance of an entry: its ``conformance_example()`` hook, else ``create()`` with
    :func:`example_kwargs` (projectors: ``in_dim=8, out_dim=6``; tokenizers: trained on
    :data:`EXAMPLE_CORPUS` with ``vocab_size=320``; objectives: no arguments)."""
    hook = getattr(get(_checked_kind(kind), name), "conformance_example", None)
    if hook is not None:
        return hook()
    kwargs = example_kwargs(kind)
    try:
        return create(kind, name, **kwargs)
    except (TypeError, ValueError) as exc:
        given = f"with {sorted(kwargs)}" if kwargs else "without arguments"
        raise ConformanceError(
            f"{kind} {name!r} cannot be built {given} ({exc}); give the registered object a "
            "conformance_example() that returns a small instance"
        ) from exc


def check_rebuild(kind: str, name: str, component: Any) -> None:
    """``create(kind, name, **config_dict())`` after a JSON round trip — how a model directory
    rebuilds its components — gives the same class and config, and the component's state dict
    loads into it strictly (same names and shapes)."""
    what = f"{kind} {name!r} ({type(component).__name__})"
    _check_config_dict(what, component)
    config = json.loads(json.dumps(component.config_dict()))  # as config.json holds it
    try:
        rebuilt = create(kind, name, **config)
    except (TypeError, ValueError) as exc:
        raise _fail(what, f"cannot be rebuilt from its config_dict() {config} ({exc})") from exc
    if type(rebuilt) is not type(component):
        raise _fail(
            what, f"rebuilt from its config_dict() as a {type(rebuilt).__name__}, not the same"
        )
    again = json.loads(json.dumps(rebuilt.config_dict()))
    if again != config:
        raise _fail(what, f"config_dict() changes when rebuilt from it: {config} → {again}")
    try:
        load_model_state(rebuilt, model_state_dict(component), Path(f"<{kind} {name}>"))
    except ValueError as exc:
        raise _fail(
            what, f"its weights do not fit the component rebuilt from config_dict(): {exc}"
        ) from None


def check_entry(kind: str, name: str) -> None:
    """Build the registry entry ``(kind, name)``, run the conformance check of its kind, and
    for a component with weights :func:`check_rebuild`."""
    component = build_example(kind, name)
    CHECKS[kind](component)
    if isinstance(component, torch.nn.Module):
        check_rebuild(kind, name, component)
