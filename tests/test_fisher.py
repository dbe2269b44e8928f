"""Fisher calibration: hooked per-sequence gradients, batches, files and the cache."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from qpeft.calibration.fisher import empirical_fisher, load_fisher, save_fisher
from qpeft.calibration.stream import LayerwiseLM
from qpeft.data.calibration import calibration_batches, calibration_text
from qpeft.errors import QpeftError
from qpeft.models.selection import DEFAULT_TARGETS, select_linear


def _brute_force_fisher(model, names, batches):
    """Mean over sequences of the squared gradient of each sequence's mean NLL,
    from ordinary parameter gradients, one sequence at a time."""
    squares = {n: 0.0 for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: model.get_submodule(n).weight for n in names}
    for p in params.values():
        p.requires_grad_(True)
    for ids in batches:
        model.zero_grad()
        logits = model(ids.unsqueeze(0)).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, ids[1:]).backward()
        for n, p in params.items():
            squares[n] = squares[n] + p.grad.square()
    for p in params.values():
        p.requires_grad_(False)
    return {n: s / len(batches) for n, s in squares.items()}


def test_hooked_fisher_matches_brute_force(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names = select_linear(model, DEFAULT_TARGETS)
    batches = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    lm = LayerwiseLM(tiny_model_dir)
    stats = empirical_fisher(lm, names, batches, batch_size=2, progress=False)
    elementwise = empirical_fisher(lm, names, batches, batch_size=2, progress=False, elementwise=True)
    exact = _brute_force_fisher(model, names, batches)
    assert stats.element == {} and sorted(elementwise.element) == sorted(names)
    for name in names:
        torch.testing.assert_close(stats.row_mean[name], exact[name].mean(dim=1), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(stats.col_mean[name], exact[name].mean(dim=0), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(elementwise.element[name], exact[name], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(elementwise.row_mean[name], stats.row_mean[name])
    r, c = stats.weights(names[0])
    torch.testing.assert_close(r, exact[names[0]].mean(dim=1).sqrt(), rtol=1e-4, atol=1e-9)
    assert c.shape == (model.get_submodule(names[0]).in_features,)


def test_fisher_file_round_trip(tmp_path, tiny_model_dir):

    lm = LayerwiseLM(tiny_model_dir)
    names = select_linear(lm.model, ["q_proj"])
    stats = empirical_fisher(lm, names, torch.randint(0, 300, (2, 16)), progress=False, elementwise=True)
    stats.metadata = {"sequences": 2, "data": "x"}
    save_fisher(tmp_path / "f.safetensors", stats)
    back = load_fisher(tmp_path / "f.safetensors")
    assert back.metadata == stats.metadata and sorted(back.row_mean) == sorted(names)
    assert all(torch.equal(back.col_mean[n], stats.col_mean[n]) for n in names)
    assert all(torch.equal(back.element[n], stats.element[n]) for n in names)
    with pytest.raises(QpeftError, match="no entry for nope"):
        back.weights("nope")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(QpeftError, match="is not a qpeft Fisher file"):
        load_fisher(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "f.safetensors").read_bytes()[:6])
    with pytest.raises(QpeftError, match=r"cannot read the Fisher file .*cut\.safetensors: .*header"):
        load_fisher(tmp_path / "cut.safetensors")


def test_calibration_batches_are_seeded_windows():
    ids = torch.arange(1000)
    a = calibration_batches(ids, 5, 32, seed=3)
    assert a.shape == (5, 32) and torch.equal(a, calibration_batches(ids, 5, 32, seed=3))
    assert not torch.equal(a, calibration_batches(ids, 5, 32, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 31, dtype=a.dtype))  # contiguous windows
    with pytest.raises(QpeftError, match="fewer than one sequence of 2000"):
        calibration_batches(ids, 1, 2000, seed=0)


def test_calibration_text_never_uses_the_test_split(tmp_path):
    text, name = calibration_text("wikitext2")
    assert name == "wikitext2:valid" and len(text) > 100_000
    with pytest.raises(QpeftError, match=r"neither a built-in text \(wikitext2, python-docs\) nor a text file"):
        calibration_text(str(tmp_path / "missing.txt"))


def test_each_built_in_text_calibrates_and_evaluates_on_disjoint_files():
    from qpeft.data.training import load_text
    from qpeft.eval.perplexity import load_eval_text

    for name, calib_label in (("wikitext2", "wikitext2:valid"), ("python-docs", "python-docs:calib")):
        calib, label = calibration_text(name)
        test = load_eval_text(name)
        assert label == calib_label and len(calib) > 500_000 and len(test) > 500_000
        assert load_text(name) == calib and load_text(name, "test") == test
        # the paragraphs of the test text are (almost all) absent from the calibration text
        seen = set(calib.split("\n"))
        paragraphs = [p for p in test.split("\n") if len(p.split()) >= 8]
        assert sum(p in seen for p in paragraphs) <= 0.005 * len(paragraphs)
    with pytest.raises(QpeftError, match=r"^unknown evaluation data 'pydocs': use one of wikitext2, python-docs, or"):
        load_eval_text("pydocs")


def test_calibrate_caches_by_settings(tiny_model_dir, tmp_path, monkeypatch):
    from qpeft.calibration.cache import calibrate

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    first, path, hit = calibrate(tiny_model_dir, ["q_proj", "down_proj"], num_sequences=2, seqlen=16)
    assert not hit and path.is_file() and first.metadata["sequences"] == 2
    again, same_path, hit = calibrate(tiny_model_dir, ["q_proj", "down_proj"], num_sequences=2, seqlen=16)
    assert hit and same_path == path
    assert all(torch.equal(again.row_mean[n], first.row_mean[n]) for n in first.row_mean)
    _, other_path, hit = calibrate(tiny_model_dir, ["q_proj", "down_proj"], num_sequences=2, seqlen=16, seed=1)
    assert not hit and other_path != path


def test_fisher_pass_also_collects_the_grams(tiny_model_dir, tmp_path, monkeypatch):
    """calibrate(activations=True) caches the XᵀX of the layer inputs from the Fisher's
    forward sweep: calibrate_activations then finds it, and it equals the Grams of
    their own sweep; the Fisher is the one calibrate gives alone (the backward sweep
    re-runs the layers without adding to the Grams)."""
    from qpeft.calibration.cache import calibrate, calibrate_activations

    targets, sizes = ["q_proj", "k_proj", "down_proj"], {"num_sequences": 3, "seqlen": 16}
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "together"))
    fisher, _, hit = calibrate(tiny_model_dir, targets, activations=True, **sizes)
    grams, grams_hit = calibrate_activations(tiny_model_dir, targets, **sizes)
    assert not hit and grams_hit and grams.tokens == 3 * 16
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "apart"))
    alone, _, _ = calibrate(tiny_model_dir, targets, **sizes)
    own, own_hit = calibrate_activations(tiny_model_dir, targets, **sizes)
    assert not own_hit and own.owner == grams.owner and set(own.grams) == set(grams.grams)
    for key in own.grams:
        torch.testing.assert_close(grams.grams[key], own.grams[key], rtol=1e-6, atol=0)
    for name in alone.row_mean:
        assert torch.equal(fisher.row_mean[name], alone.row_mean[name])
        assert torch.equal(fisher.col_mean[name], alone.col_mean[name])


def test_cached_grams_are_written_layer_by_layer_and_equal_the_sums(tiny_model_dir, tmp_path, monkeypatch):
    """The cached XᵀX reach their directory as each decoder layer completes, and the
    collector holds none once they are written; a crashed run's stray files are
    cleared first; the cache reads back equal to an in-memory sweep over the same
    batches, rounded to fp32 (its storage, the upper triangle)."""
    import qpeft.calibration.activations as activations
    from qpeft.calibration.cache import calibrate_activations

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    held, written = [], []
    layer_done = activations.GramCollector.layer_done

    def watched(self, index):
        layer_done(self, index)
        held.append(len(self.hooks.grams) + len(self.kept))
        written.append(sorted(p.stem for p in self.spill.glob("*.safetensors")))

    monkeypatch.setattr(activations.GramCollector, "layer_done", watched)
    targets, sizes = ["q_proj", "k_proj", "o_proj", "down_proj"], {"num_sequences": 2, "seqlen": 16}
    calibrate_activations(tiny_model_dir, targets, **sizes)
    layers = len(written)
    assert layers >= 2 and held == [0] * layers
    assert [len(w) for w in written] == [3 * (i + 1) for i in range(layers)]  # q/k share, o, down
    # a run that crashed before its description was written: its files are cleared
    (index,) = (tmp_path / "cache" / "activations").glob("*.safetensors")
    index.unlink()
    (activations.grams_dir(index) / "stray.safetensors").write_bytes(b"partial")
    monkeypatch.setattr(activations.GramCollector, "layer_done", layer_done)
    grams, hit = calibrate_activations(tiny_model_dir, targets, **sizes)
    files = sorted(activations.grams_dir(index).glob("*.safetensors"))
    assert not hit and len(files) == 3 * layers and set(grams.grams) == {f.stem for f in files}

    text, _ = calibration_text("wikitext2")
    from transformers import AutoTokenizer

    from qpeft.eval.perplexity import tokenize

    ids = tokenize(AutoTokenizer.from_pretrained(tiny_model_dir), text)
    batches = calibration_batches(ids, 2, 16, 0)
    lm = LayerwiseLM(tiny_model_dir)
    names = select_linear(lm.model, targets)
    in_memory = activations.input_grams(lm, names, batches, progress=False)
    assert in_memory.owner == grams.owner and grams.tokens == in_memory.tokens == 32
    for key in in_memory.grams:  # stored as fp32, the sums' own fp64 values rounded once
        assert torch.equal(in_memory.grams[key].float().double(), grams.grams[key])


def test_grams_cached_in_one_file_by_earlier_versions_still_load(tmp_path):
    from qpeft.calibration.activations import METADATA_KEY, load_grams
    from qpeft.io.tagged import save_tagged

    gram = torch.randn(6, 6, dtype=torch.float64)
    description = {"owner": {"a.q": "a.q", "a.k": "a.q"}, "tokens": 12, "settings": {"sequences": 3}}
    save_tagged(tmp_path / "old.safetensors", {"a.q": gram}, METADATA_KEY, description)
    grams = load_grams(tmp_path / "old.safetensors")
    assert torch.equal(grams.gram("a.k"), gram) and grams.tokens == 12 and list(grams.grams) == ["a.q"]


def test_a_gram_file_holds_the_upper_triangle_in_fp32(tmp_path):
    from safetensors import safe_open

    from qpeft.calibration.activations import GramFiles, _write_gram

    x = torch.randn(40, 7, dtype=torch.float64)
    gram = x.T @ x
    gram = (gram + gram.T) / 2  # exactly symmetric, as the collector's are
    _write_gram(tmp_path, "layer.q", gram)
    with safe_open(str(tmp_path / "layer.q.safetensors"), framework="pt") as handle:
        stored = handle.get_tensor("upper")
    assert stored.dtype == torch.float32 and stored.numel() == 7 * 8 // 2
    back = GramFiles(tmp_path, ["layer.q"])["layer.q"]
    assert back.dtype == torch.float64 and torch.equal(back, back.T) and torch.equal(back, gram.float().double())
    with pytest.raises(KeyError):
        GramFiles(tmp_path, ["layer.q"])["layer.k"]
    (tmp_path / "layer.k.safetensors").write_bytes(b"partial")  # an interrupted copy
    with pytest.raises(QpeftError, match=r"cannot read the Gram matrix .*layer\.k\.safetensors"):
        GramFiles(tmp_path, ["layer.k"])["layer.k"]
