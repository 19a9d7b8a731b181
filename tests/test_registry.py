"""The model registry (serving.table.ModelTable) without HTTP: real loads of tiny random-weight
Llama checkpoints, waiter coalescing, keep_alive expiry and pinning, LRU eviction by count
and by memory, a busy model never evicted, and failures kept to their own model."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
from hf_checkpoints import hf_model, save_checkpoint
from server_process import TINY_ENGINE_CONFIG

from mrs.config.schema import PLAIN, EngineConfig, ModelEntry, ModelSource, ServeConfig, ServerConfig
from mrs.errors import ModelUnavailable
from mrs.heap import release_free_heap
from mrs.loading.estimate import estimate_bytes
from mrs.pipeline import load
from serving import table as table_module
from serving.table import EVICTED, FAILED, LOADED, UNLOADED, ModelTable

ENGINE = EngineConfig(**TINY_ENGINE_CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("registry") / "tiny")


def entry(model_id: str, path: Path, **fields) -> ModelEntry:
    return ModelEntry(model_id, ModelSource(kind=PLAIN, model_id=str(path), arch="llama"), **fields)


def table(entries: list[ModelEntry], loader=load, **server) -> ModelTable:
    return ModelTable(ServeConfig(server=ServerConfig(**server), engine=ENGINE, models=entries), loader=loader)


def counting(loader=load):
    """The real loader, counting its calls per model."""
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def counted(e: ModelEntry, engine: EngineConfig):
        with lock:
            calls[e.model_id] = calls.get(e.model_id, 0) + 1
        return loader(e, engine)

    return counted, calls


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def generate(t: ModelTable, model_id: str) -> list[int]:
    with t.lease(model_id) as served:
        return served.generate([5, 6, 7], max_tokens=4, ignore_eos=True).token_ids


def test_twenty_waiters_cause_one_load_and_all_get_it(checkpoint: Path) -> None:
    loader, calls = counting()
    t = table([entry("a", checkpoint, lazy=True)], loader)
    assert t.status("a") == UNLOADED
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = list(pool.map(lambda _: t.ensure_loaded("a"), range(20)))
        served = {id(f.result(timeout=300)) for f in futures}
    assert calls == {"a": 1} and len(served) == 1 and t.status("a") == LOADED
    assert len(generate(t, "a")) == 4
    t.shutdown()


def test_without_autoload_an_unloaded_model_is_unavailable(checkpoint: Path) -> None:
    t = table([entry("a", checkpoint, lazy=True)], autoload=False)
    with pytest.raises(ModelUnavailable, match="unloaded"):
        t.ensure_loaded("a").result()
    assert t.reload("a") == LOADED
    t.shutdown()


def test_keep_alive_expires_idle_models_and_never_a_busy_or_pinned_one(checkpoint: Path) -> None:
    t = table([entry("pinned", checkpoint, keep_alive="-1"), entry("short", checkpoint, keep_alive="2s")])
    t.load_all()  # the default ("pinned") first, so "short" was loaded just now
    lease = t.lease("short")  # busy: must outlive its keep_alive
    time.sleep(3.0)
    assert t.status("short") == LOADED and t.card("short")["expires_at"] is None
    lease.release()
    assert t.card("short")["expires_at"] is not None
    wait_for(lambda: t.status("short") == UNLOADED)
    assert t.status("pinned") == LOADED and t.card("pinned")["pinned"]
    # a request's keep_alive replaces the model's: 0 unloads as soon as it is idle
    t.ensure_loaded("pinned").result()
    t.lease("pinned", keep_alive=0).release()
    wait_for(lambda: t.status("pinned") == UNLOADED)
    assert t.stats()["short"]["unloads"] == 1
    t.shutdown()


def test_lru_eviction_by_count_spares_the_busy_model_and_waits_for_it(checkpoint: Path) -> None:
    t = table([entry(m, checkpoint, lazy=True) for m in ("a", "b", "c")], max_loaded_models=2, load_timeout_s=60)
    t.ensure_loaded("a").result()
    t.ensure_loaded("b").result()
    generate(t, "a")  # b is now the least recently used
    t.ensure_loaded("c").result()
    assert (t.status("a"), t.status("b"), t.status("c")) == (LOADED, EVICTED, LOADED)
    # both loaded models busy: loading b waits until one is released, then evicts it
    lease_a, lease_c = t.lease("a"), t.lease("c")
    pending = t.ensure_loaded("b")
    time.sleep(1.0)
    assert not pending.done() and t.status("a") == t.status("c") == LOADED
    lease_c.release()
    pending.result(timeout=120)
    assert (t.status("a"), t.status("b"), t.status("c")) == (LOADED, LOADED, EVICTED)
    lease_a.release()
    assert t.stats()["b"]["evictions"] == 1 and t.stats()["c"]["evictions"] == 1
    t.shutdown()


def test_a_load_with_every_model_busy_gives_up_at_the_load_timeout(checkpoint: Path) -> None:
    t = table([entry("a", checkpoint), entry("b", checkpoint, lazy=True)], max_loaded_models=1, load_timeout_s=1)
    t.load_all()
    with t.lease("a"):
        with pytest.raises(ModelUnavailable, match="busy"):
            t.ensure_loaded("b").result(timeout=60)
    assert t.status("a") == LOADED and t.status("b") == FAILED
    t.shutdown()


def test_eviction_by_memory_and_a_model_too_big_for_the_budget(checkpoint: Path) -> None:
    one = estimate_bytes(entry("x", checkpoint), ENGINE)
    t = table([entry(m, checkpoint, lazy=True) for m in ("a", "b")] + [entry("big", checkpoint, lazy=True, max_seqs=64)],
              max_memory=str(int(one * 1.5)))
    t.ensure_loaded("a").result()
    t.ensure_loaded("b").result()
    assert (t.status("a"), t.status("b")) == (EVICTED, LOADED)
    with pytest.raises(ModelUnavailable, match="more than the whole memory budget"):
        t.ensure_loaded("big").result()
    assert t.status("b") == LOADED  # nothing was evicted for a model that cannot fit
    t.shutdown()


def test_the_estimate_is_close_to_what_a_load_measures(checkpoint: Path) -> None:
    t = table([entry("a", checkpoint)])
    t.load_all()
    measured = t.stats()["a"]["loaded_bytes"]
    assert 0.9 * measured <= estimate_bytes(entry("a", checkpoint), ENGINE) <= 1.5 * measured
    t.shutdown()


def test_a_failed_load_keeps_to_its_model(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    t = table([entry("good", checkpoint), entry("broken", broken)])
    t.load_all()
    assert t.status("good") == LOADED and t.status("broken") == FAILED and t.error("broken")
    with pytest.raises(ModelUnavailable, match="failed to load"):
        t.ensure_loaded("broken").result()
    assert len(generate(t, "good")) == 4
    t.shutdown()


def test_an_unload_frees_the_model_before_the_heap_is_trimmed(checkpoint: Path, monkeypatch) -> None:
    """Unloading or removing drops the last reference to the pipeline (its weights and KV
    pool) before the heap trim (mrs.heap), so the trim has their pages to give back."""
    t = table([entry("a", checkpoint), entry("b", checkpoint)])
    t.load_all()
    assert len(generate(t, "b")) == 4
    pipeline = {m: weakref.ref(t._rows[m].served) for m in ("a", "b")}
    freed_at_trim: list[dict[str, bool]] = []

    def trim() -> None:  # the real trim, noting which pipelines were gone when it ran
        freed_at_trim.append({m: ref() is None for m, ref in pipeline.items()})
        release_free_heap()

    monkeypatch.setattr(table_module, "release_free_heap", trim)
    t.unload("a")
    t.remove("b")
    assert freed_at_trim == [{"a": True, "b": False}, {"a": True, "b": True}]
    t.shutdown()


def test_add_and_remove_at_runtime(checkpoint: Path) -> None:
    t = table([entry("a", checkpoint)])
    t.load_all()
    t.add(entry("b", checkpoint)).result(timeout=300)
    assert t.ids == ["a", "b"] and t.status("b") == LOADED
    lease = t.lease("b")
    removed = threading.Thread(target=t.remove, args=("b",))
    removed.start()
    time.sleep(0.5)
    assert removed.is_alive()  # waits for the request holding it
    lease.release()
    removed.join(30)
    assert t.ids == ["a"]
    t.shutdown()


def test_the_python_api_takes_the_json_files_entry_form(checkpoint: Path) -> None:
    seed_entry = {"model_id": "t", "model": {"Plain": {"model_id": str(checkpoint), "arch": "llama"}},
                  "max_seqs": 1, "keep_alive": "5m"}
    with load(seed_entry, ENGINE) as pipe:
        assert pipe.entry.model_id == "t" and pipe.entry.keep_alive == "5m"
        assert pipe.engine.max_batch == 1  # the entry's own engine setting
        assert len(pipe.generate([5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3
