"""fold(DIR, affine=True, output=OUT/) and rotate(DIR, output=OUT/) rewrite the model on its output's own
pages (normsurgeon.mapped_output): the saved directory must be exactly the verified model, the input
untouched, and the model handed back plain memory that no later change carries into the saved file."""

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from normsurgeon import api, mapped_output, replay, zoo_llm
from normsurgeon.saving import TMP_PREFIX

pytestmark = pytest.mark.skipif(not mapped_output.available(), reason="Linux only")


@pytest.fixture(autouse=True)
def small_models_too(monkeypatch):
    # as for a model of 1 GiB or more: the mapped path, and the save's byte-for-byte round trip
    from normsurgeon import verify

    monkeypatch.setattr(mapped_output, "MIN_BYTES", 0)
    monkeypatch.setattr(verify, "LEAN_BYTES", 0)


@pytest.fixture
def spies(monkeypatch):
    """What prepare returned, which tensors went file to file, which from memory, and whether save wrote weights."""
    seen = {"prepared": [], "copied": 0, "written": 0, "saved_weights": 0}
    prepare, copy, write = mapped_output.prepare, mapped_output._copy_range, mapped_output._write_tensor

    def spy_prepare(*a, **k):
        m = prepare(*a, **k)
        seen["prepared"].append(m)
        return m

    def spy_copy(*a):
        seen["copied"] += 1
        return copy(*a)

    def spy_write(*a):
        seen["written"] += 1
        return write(*a)

    import safetensors.torch as st
    save_model = st.save_model

    def spy_save_model(model, filename, *a, **k):
        if str(filename).endswith(".part"):
            seen["saved_weights"] += 1
        return save_model(model, filename, *a, **k)

    monkeypatch.setattr(mapped_output, "prepare", spy_prepare)
    monkeypatch.setattr(mapped_output, "_copy_range", spy_copy)
    monkeypatch.setattr(mapped_output, "_write_tensor", spy_write)
    monkeypatch.setattr(st, "save_model", spy_save_model)
    return seen


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _llama_dir(tmp_path, dtype=torch.bfloat16):
    src = tmp_path / "llama"
    zoo_llm.llama().to(dtype).save_pretrained(src)
    return src


def _same_as_file(model, file):
    saved = load_file(str(file))
    state = model.state_dict()
    assert set(saved) <= set(state)
    for k, t in saved.items():
        assert torch.equal(t, state[k]), k


def _no_leftovers(folder):
    assert not [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_fold_writes_the_output_in_place_and_hands_back_plain_memory(tmp_path, spies):
    import transformers

    src = _llama_dir(tmp_path)
    before = _sha(src / "model.safetensors")
    out = tmp_path / "out"
    model, report = api.fold(src, affine=True, output=f"{out}/")
    assert report.passed and report.output
    (mapped,) = spies["prepared"]
    # every tensor came file to file (the proof held for all: nothing was changed before the fold), and
    # save found the weights already written
    assert mapped is not None and spies["copied"] > 0 and spies["written"] == 0 and spies["saved_weights"] == 0
    assert _sha(src / "model.safetensors") == before
    _same_as_file(model, out / "model.safetensors")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.all(reloaded.model.norm.weight == 1)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # the model handed back is plain memory now: changing it leaves the saved file as it was
    saved = _sha(out / "model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert _sha(out / "model.safetensors") == saved
    _no_leftovers(tmp_path)


def test_rotate_writes_the_output_in_place_from_a_recipe_directory(tmp_path, spies):
    src = _llama_dir(tmp_path, torch.float32)
    folded = tmp_path / "folded"
    api.fold(src, affine=True, output=f"{folded}/")
    spies.update(prepared=[], copied=0, written=0, saved_weights=0)
    out = tmp_path / "rotated"
    model, report = api.rotate(f"{folded}/", seed=3, output=f"{out}/")
    assert report.rotated and report.output
    (mapped,) = spies["prepared"]
    # the recipe directory was loaded mapped (the call writes its output first): every tensor file to file
    assert mapped is not None and spies["copied"] > 0 and spies["written"] == 0 and spies["saved_weights"] == 0
    _same_as_file(model, out / "model.safetensors")
    original = load_file(str(folded / "model.safetensors"))
    assert not torch.equal(original["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    reloaded = api.load(f"{out}/").model
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    _no_leftovers(tmp_path)


def test_the_output_file_is_copied_while_the_model_loads(tmp_path, spies, monkeypatch):
    # the copy begins before the load, on a thread of its own, and prepare takes its file over: a
    # transformers checkpoint (fold) and a recipe directory (rotate)
    import threading

    threads = []
    copy_range = mapped_output._copy_range
    monkeypatch.setattr(mapped_output, "_copy_range",
                        lambda *a: threads.append(threading.current_thread().name) or copy_range(*a))
    taken = []
    hand_over = mapped_output.EarlyCopy.hand_over
    monkeypatch.setattr(mapped_output.EarlyCopy, "hand_over", lambda self: taken.append(self) or hand_over(self))
    src = _llama_dir(tmp_path)
    folded, rotated = tmp_path / "folded", tmp_path / "rotated"
    model, report = api.fold(src, affine=True, output=f"{folded}/")
    assert report.passed and report.output and len(taken) == 1
    assert threads and set(threads) == {"normsurgeon-early-copy"}
    _same_as_file(model, folded / "model.safetensors")
    threads.clear()
    model, report = api.rotate(f"{folded}/", seed=2, output=f"{rotated}/")
    assert report.rotated and report.output and len(taken) == 2
    assert threads and set(threads) == {"normsurgeon-early-copy"}
    _same_as_file(model, rotated / "model.safetensors")
    assert spies["written"] == 0 and spies["saved_weights"] == 0
    _no_leftovers(tmp_path)


def test_an_early_copy_is_not_used_when_the_file_changed_or_a_tensor_did(tmp_path, spies):
    from safetensors.torch import save_file

    src = _llama_dir(tmp_path)
    file = src / "model.safetensors"
    out = (tmp_path / "out").resolve()
    early = mapped_output.start_early(file, out, "model.safetensors")
    assert early is not None
    # the file rewritten after the copy began, one tensor changed: the copy holds the old bytes
    state = load_file(str(file))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] * 2
    early.finished_for(file, early.start, early.header)  # the copy is done before the file changes
    before = file.stat()
    save_file(state, str(file), metadata={"format": "pt"})
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # coarse clocks: a new time for sure
    model = api.load(src).model
    mapped = mapped_output.prepare(model, out, "model.safetensors", early=early)
    try:
        assert not early.taken and not early.dir.exists()  # copied anew from the file as it is now
        _same_as_file(model, mapped.file)
        assert torch.equal(load_file(str(mapped.file))["model.layers.0.mlp.up_proj.weight"],
                           state["model.layers.0.mlp.up_proj.weight"])
    finally:
        mapped.close()
    # an unchanged file, a tensor changed in memory since loading: the copy is taken, that tensor written
    early = mapped_output.start_early(file, out, "model.safetensors")
    model = api.load(src).model
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3)
    early.finished_for(file, early.start, early.header)
    spies.update(written=0, copied=0)
    mapped = mapped_output.prepare(model, out, "model.safetensors", early=early)
    try:
        # that tensor (and neighbours sharing a page with it) from memory, nothing copied after the load
        assert early.taken and mapped.file == early.file and 1 <= spies["written"] < 10 and spies["copied"] == 0
        _same_as_file(model, mapped.file)
    finally:
        mapped.close()
        early.close()
    _no_leftovers(tmp_path)


def test_a_header_the_file_does_not_match_gets_no_early_copy(tmp_path):
    import json

    out = (tmp_path / "out").resolve()
    for offsets in ([0, 64], [8, 4]):  # past the file's end (16 bytes of data); backwards
        text = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}).encode()
        file = tmp_path / "model.safetensors"
        file.write_bytes(len(text).to_bytes(8, "little") + text + bytes(16))
        assert mapped_output.start_early(file, out, "model.safetensors") is None
    _no_leftovers(tmp_path)


def test_a_failed_load_stops_the_early_copy_and_leaves_nothing(tmp_path, monkeypatch):
    from normsurgeon.errors import NormSurgeonError

    src = _llama_dir(tmp_path)
    started = []
    start_early = mapped_output.start_early
    monkeypatch.setattr(mapped_output, "start_early", lambda *a, **k: started.append(start_early(*a, **k)) or started[-1])

    def broken(*a, **k):
        raise NormSurgeonError("cannot load")

    monkeypatch.setattr(api, "load", broken)
    with pytest.raises(NormSurgeonError, match="cannot load"):
        api.rotate(src, output=f"{tmp_path / 'out'}/")
    assert started and started[0] is not None and not started[0]._thread.is_alive()
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_a_tensor_changed_since_loading_is_written_from_memory(tmp_path, spies):
    src = _llama_dir(tmp_path)
    model = api.load(src).model
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # a private copy of those pages now
    mapped = mapped_output.prepare(model, (tmp_path / "out").resolve(), replay.WEIGHTS_FILE)
    try:
        # the changed tensor, and neighbours sharing one of its pages, come from memory; the rest file to file
        total = len(load_file(str(src / "model.safetensors")))
        assert 1 <= spies["written"] < total // 2 and spies["written"] + spies["copied"] == total
        saved = load_file(str(mapped.file))
        assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
        original = load_file(str(src / "model.safetensors"))
        assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], 2 * original["model.layers.0.mlp.up_proj.weight"])
        assert torch.equal(saved["model.layers.1.mlp.up_proj.weight"], original["model.layers.1.mlp.up_proj.weight"])
        assert mapped.holds(model)
        # the model's tensors are the file's pages: a write shows in the file while it is mapped shared
        with torch.no_grad():
            model.lm_head.weight.zero_()
        assert torch.all(load_file(str(mapped.file))["lm_head.weight"] == 0)
    finally:
        mapped.close()
    assert not mapped.dir.exists()
    with torch.no_grad():  # still usable after the directory is gone, as plain memory
        model.lm_head.weight.add_(1)
    assert torch.all(model.lm_head.weight == 1)


def test_a_fold_that_adds_tensors_saves_them_the_plain_way(tmp_path, spies):
    # StableLM's q/k/v have no bias: folding the LayerNorm's β creates them, so the mapped file no
    # longer holds the model and save writes the weights anew (beside, then renamed over it)
    src = tmp_path / "stablelm"
    zoo_llm.stablelm().save_pretrained(src)
    out = tmp_path / "out"
    model, report = api.fold(src, affine=True, output=f"{out}/")
    assert report.passed and report.output
    assert any(a.detail.get("created_bias") for a in report.affine_actions)
    (mapped,) = spies["prepared"]
    assert mapped is not None and spies["saved_weights"] == 1
    _same_as_file(model, out / "model.safetensors")
    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())
    assert not (out / "model.safetensors.part").exists()
    _no_leftovers(tmp_path)


def test_a_failed_fold_leaves_no_output_and_no_temporary_directory(tmp_path, spies, monkeypatch):
    from normsurgeon.passes import fold as fold_pass

    src = _llama_dir(tmp_path)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(fold_pass, "fold", broken)
    with pytest.raises(RuntimeError, match="boom"):
        api.fold(src, affine=True, output=f"{tmp_path / 'out'}/")
    assert spies["prepared"] and spies["prepared"][0] is not None
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_models_the_call_did_not_load_are_saved_the_plain_way(tmp_path, spies):
    # a model object belongs to the caller: its tensors are never moved onto a file
    model = zoo_llm.llama()
    api.fold(model, model.example_inputs(), affine=True, output=f"{tmp_path / 'out'}/")
    assert spies["prepared"] == [] and spies["saved_weights"] == 1


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from normsurgeon.errors import NormSurgeonError

    src = _llama_dir(tmp_path)

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mapped_output, "_copy_range", full)
    with pytest.raises(NormSurgeonError, match="cannot write the weights.*No space left"):
        api.fold(src, affine=True, output=f"{tmp_path / 'out'}/")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_if_the_mapping_cannot_turn_private_the_model_gets_copies(tmp_path, monkeypatch):
    src = _llama_dir(tmp_path)

    def fail(*a):
        raise OSError("no")

    from normsurgeon import pages

    monkeypatch.setattr(pages, "remap_private", fail)
    out = tmp_path / "out"
    model, report = api.fold(src, affine=True, output=f"{out}/")
    saved = _sha(out / "model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert _sha(out / "model.safetensors") == saved


def _same_files(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_the_mapped_path_writes_what_the_plain_save_writes(tmp_path, monkeypatch):
    src = _llama_dir(tmp_path)
    api.fold(src, affine=True, output=f"{tmp_path / 'fold_mapped'}/")
    api.rotate(f"{tmp_path / 'fold_mapped'}/", seed=1, output=f"{tmp_path / 'rot_mapped'}/")
    monkeypatch.setattr(mapped_output, "MIN_BYTES", 1 << 62)
    api.fold(src, affine=True, output=f"{tmp_path / 'fold_plain'}/")
    api.rotate(f"{tmp_path / 'fold_plain'}/", seed=1, output=f"{tmp_path / 'rot_plain'}/")
    _same_files(tmp_path / "fold_mapped" / "model.safetensors", tmp_path / "fold_plain" / "model.safetensors")
    _same_files(tmp_path / "rot_mapped" / "model.safetensors", tmp_path / "rot_plain" / "model.safetensors")


def test_files_the_kernel_will_not_copy_between_are_copied_through_a_buffer(tmp_path, spies, monkeypatch):
    import errno

    src = _llama_dir(tmp_path)

    def cross_device(*a):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(mapped_output, "_copy_range", cross_device)
    model, report = api.fold(src, affine=True, output=f"{tmp_path / 'out'}/")
    assert report.passed and spies["prepared"][0] is not None and spies["saved_weights"] == 0
    _same_as_file(model, tmp_path / "out" / "model.safetensors")


def test_a_tied_tensor_stored_under_two_keys_takes_the_plain_save(tmp_path, spies):
    import transformers
    from safetensors.torch import save_file

    src = tmp_path / "tied"
    model = zoo_llm.llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(src)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})  # both keys, one tensor
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    out, report = api.fold(src, affine=True, output=f"{tmp_path / 'out'}/")
    assert report.output and spies["prepared"] == [None] and spies["saved_weights"] == 1


def _rss_anon_mib():
    return [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")][0] // 1024


def _glibc():
    import ctypes

    return hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_the_memory_the_moved_tensors_held_goes_back_to_the_system(tmp_path):
    # a recipe directory is read into the process's heap; once its tensors are on the output's file,
    # that memory must leave the process (glibc keeps freed heap blocks: a 1.1B rotate -o peaked at 4.4 GB)
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    api.fold(tmp_path / "src", affine=True, output=f"{tmp_path / 'recipe'}/")
    model = api.load(f"{tmp_path / 'recipe'}/").model
    size = sum(p.numel() * p.element_size() for p in model.parameters()) >> 20  # 71 MiB
    before = _rss_anon_mib()
    mapped = mapped_output.prepare(model, (tmp_path / "out").resolve(), replay.WEIGHTS_FILE)
    try:
        assert before - _rss_anon_mib() > 0.7 * size
    finally:
        mapped.close()


def test_a_rolled_back_site_leaves_its_original_bytes_in_the_output(tmp_path, spies, monkeypatch):
    from normsurgeon.passes import norm_affine

    src = _llama_dir(tmp_path)
    real, wrong = norm_affine.rewrite, "model.layers.1.input_layernorm"

    def folds_wrongly(site, model, undo):  # the real fold, then γ left on the norm (×3): outputs change
        action = real(site, model, undo)
        if site.norm == wrong:
            with torch.no_grad():
                model.get_submodule(wrong).weight.mul_(3)
        return action

    monkeypatch.setattr(norm_affine, "rewrite", folds_wrongly)
    model, report = api.fold(src, affine=True, output=f"{tmp_path / 'out'}/")
    assert report.output and spies["prepared"][0] is not None and spies["saved_weights"] == 0
    assert [a.path for a in report.rolled_back] == [wrong]
    saved, original = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(src / "model.safetensors"))
    for k in (f"{wrong}.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert torch.equal(saved[k], original[k]), k  # put back on the output's own pages
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"])
    _same_as_file(model, tmp_path / "out" / "model.safetensors")


def test_force_replaces_an_output_and_an_output_that_appeared_is_kept(tmp_path, spies, monkeypatch):
    from normsurgeon.errors import NormSurgeonError

    src = _llama_dir(tmp_path)
    out = tmp_path / "out"
    api.fold(src, affine=True, output=f"{out}/")
    model, report = api.fold(src, affine=True, output=f"{out}/", force=True)
    assert report.output and all(m is not None for m in spies["prepared"])
    _same_as_file(model, out / "model.safetensors")
    _no_leftovers(tmp_path)
    # another run writes the output while this one works: this one fails, leaving that output alone
    other = tmp_path / "other"
    prepare = mapped_output.prepare

    def then_someone_writes(*a, **k):
        m = prepare(*a, **k)
        other.mkdir()
        (other / "theirs").write_text("x")
        return m

    monkeypatch.setattr(mapped_output, "prepare", then_someone_writes)
    with pytest.raises(NormSurgeonError, match="appeared|other files in it"):
        api.fold(src, affine=True, output=f"{other}/")
    assert [p.name for p in other.iterdir()] == ["theirs"]
    _no_leftovers(tmp_path)


def test_the_round_trip_reads_no_weights_back_where_the_model_is_the_files_own_pages(tmp_path, spies, monkeypatch):
    # the saved file's bytes are the model's own memory: comparing them read each page against itself;
    # a model saved the plain way is still read back and compared
    reads = []
    differs = replay._differs_from_file
    monkeypatch.setattr(replay, "_differs_from_file", lambda *a: reads.append(a) or differs(*a))
    src = _llama_dir(tmp_path)
    _, report = api.fold(src, affine=True, output=f"{tmp_path / 'mapped'}/")
    assert report.passed and spies["prepared"][0] is not None and reads == []
    model = zoo_llm.llama()
    api.fold(model, model.example_inputs(), affine=True, output=f"{tmp_path / 'plain'}/")
    assert len(reads) == 1


def test_saved_in_holds_only_for_the_mapped_file_itself(tmp_path):
    import json
    import shutil

    src = _llama_dir(tmp_path)
    model = api.load(src).model
    mapped = mapped_output.prepare(model, tmp_path / "out", "model.safetensors", min_bytes=0)
    try:
        assert mapped.saved_in(model, mapped.file)
        copy = tmp_path / "copy.safetensors"  # the same bytes in another file: not the model's pages
        shutil.copy(mapped.file, copy)
        assert not mapped.saved_in(model, copy)
        with torch.no_grad():  # a tensor moved off the file
            w = model.model.norm.weight
            w.data, kept = w.clone(), w.data
        assert not mapped.saved_in(model, mapped.file)
        w.data = kept
        assert mapped.saved_in(model, mapped.file)
        # the file itself, its header rewritten to swap two tensors of one size: not where the model's are
        raw = mapped.file.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        with open(mapped.file, "r+b") as f:
            f.seek(8)
            f.write(json.dumps(header, separators=(",", ":")).encode().ljust(size))
        assert not mapped.saved_in(model, mapped.file)
    finally:
        mapped.close()
