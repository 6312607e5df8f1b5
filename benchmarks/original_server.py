"""Run the original Search-R1 retrieval server, or any running one, under ``retrieval.py``'s load.

``benchmarks/retrieval.py throughput`` normally starts ``searchrl serve`` itself. With ``--url
URL`` it loads an already running ``/retrieve`` server instead (``--server-pid`` adds that
process's CPU time to the figures). With ``--original FILE`` it starts the original's server
file (``search_r1/search/retrieval_server.py`` of a Search-R1 checkout) over the dense index's
own FAISS file and the corpus it was built from, so both servers answer from the same vectors
with the same encoder:

- the file is copied into a temporary folder with one substitution, ``.cuda()`` -> ``.cpu()``
  (its model and its input tensors; nothing else is changed, so fp16 stays on as shipped) and
  run there with ``--original-python`` (an environment that has its dependencies, ``datasets``
  included); the copy and the ``datasets`` cache it writes are removed afterwards;
- it listens on port 8000 of all interfaces (hard-coded there), which must be free;
- it is given ``--retriever_name minilm`` (no query prefix) unless ``--original-name`` says
  otherwise, the model folder the index was built with, ``--topk 3``, ``INDEX/dense/faiss.index``
  and the corpus (``--corpus``, else the path recorded in the manifest), whose line i must be
  passage i of the index (checked, ids and contents, before it starts).

Before the load, :func:`compare_results` asks the remote server and the index in-process for the
same queries and reports how many top-k id lists agree. Left out: the original's BM25 server
(it needs pyserini and Java) and its GPU FAISS option.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import ServerProcess, log, proc_cpu_seconds

ORIGINAL_PORT = 8000  # the original binds 0.0.0.0:8000, not configurable
_CUDA_CALL = re.compile(r"\.cuda\(\)")


def patch_device(source: str) -> tuple[str, int]:
    """``source`` with every ``.cuda()`` call made ``.cpu()``, and how many were replaced.

    >>> patch_device("net.cuda()\\ntorch.cuda.synchronize()\\ny = t.cuda() + 1")
    ('net.cpu()\\ntorch.cuda.synchronize()\\ny = t.cpu() + 1', 2)
    """
    return _CUDA_CALL.subn(".cpu()", source)


def check_same_rows(index: Path, corpus: Path) -> int:
    """Raise unless line i of ``corpus`` is passage i of ``index`` (same id and contents)."""
    from searchrl.retrieval.index import PassageStore

    store = PassageStore(index)
    n = 0
    with open(corpus, encoding="utf-8") as f:
        for n, line in enumerate((x for x in f if x.strip()), 1):
            row, mine = json.loads(line), store[n - 1] if n <= len(store) else None
            if mine is None or str(row.get("id")) != mine.id or row.get("contents") != mine.contents:
                raise SystemExit(f"{corpus} line {n} is not passage {n - 1} of {index}: "
                                 "the original would return other passages than it searched")  # fmt: skip
    if n != len(store):
        raise SystemExit(f"{corpus} has {n} passages, {index} has {len(store)}")
    return n


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class OriginalServer(ServerProcess):
    """The original's ``retrieval_server.py`` (device-patched copy) in a child process (started and
    waited for here; CPU time and stopping as :class:`ServerProcess`)."""

    def __init__(self, server_file: Path, python: str, index: Path, corpus: Path, name: str,
                 log_path: Path, startup_s: float = 600.0):  # fmt: skip
        from searchrl.retrieval.dense import resolve_model

        settings = json.loads((index / "dense" / "dense.json").read_text())["model"]
        if settings.get("query_prefix") and not any(m in name.lower() for m in ("e5", "bge")):
            raise SystemExit(f"the index's queries get the prefix {settings['query_prefix']!r}; "
                             f"the original adds none for --original-name {name!r}")  # fmt: skip
        patched, count = patch_device(Path(server_file).read_text(encoding="utf-8"))
        if count == 0:
            raise SystemExit(f"{server_file}: no .cuda() call; is it the original's retrieval_server.py?")
        if not _port_free(ORIGINAL_PORT):
            raise SystemExit(f"port {ORIGINAL_PORT} is in use; the original server needs it")
        self.tmp = Path(tempfile.mkdtemp(prefix="searchr1-orig-"))
        script = self.tmp / "retrieval_server.py"
        script.write_text(patched, encoding="utf-8")
        log(f"original server: {count} .cuda() call(s) made .cpu() in {script}")
        cmd = [python, str(script), "--index_path", str(index / "dense" / "faiss.index"),
               "--corpus_path", str(corpus), "--topk", "3", "--retriever_name", name,
               "--retriever_model", resolve_model(settings["name"])]  # fmt: skip
        env = {**os.environ, "HF_DATASETS_CACHE": str(self.tmp / "hf-datasets"), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
        self.url = f"http://127.0.0.1:{ORIGINAL_PORT}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        self._wait(startup_s, log_path)

    def _wait(self, startup_s: float, log_path: Path) -> None:
        import httpx

        body = {"queries": ["ready?"], "topk": 1, "return_scores": True}  # it has no /health
        t0 = time.monotonic()
        while time.monotonic() - t0 < startup_s:
            if self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"the original server exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.post(self.url + "/retrieve", json=body, timeout=30).status_code == 200:
                    log(f"original server up after {time.monotonic() - t0:.0f} s")
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise SystemExit(f"the original server did not answer within {startup_s:.0f} s; see {log_path}")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def compare_results(url: str, index: Path, queries: list[str], k: int) -> dict:
    """How many of ``queries`` get the same top-``k`` ids from ``url`` as from ``index`` in-process."""
    from searchrl.retrieval.client import HttpRetriever
    from searchrl.retrieval.index import load_index

    client = HttpRetriever(url, timeout=120, retries=0)
    try:
        remote = client.search(queries, k)
    finally:
        client.close()
    local = load_index(index).search(queries, k)
    same = [[p.id for p in a] == [p.id for p in b] for a, b in zip(remote, local)]
    same_set = [{p.id for p in a} == {p.id for p in b} for a, b in zip(remote, local)]
    diffs = [abs(a.score - b.score) for ra, rb in zip(remote, local) for a, b in zip(ra, rb)
             if a.id == b.id]  # fmt: skip
    return {"queries": len(queries), "k": k, "same_ids_in_order": sum(same), "same_id_sets": sum(same_set),
            "max_score_diff_same_id": round(max(diffs), 6) if diffs else None,
            "differing": [{"query": q, "remote": [p.id for p in a], "local": [p.id for p in b]}
                          for q, a, b, s in zip(queries, remote, local, same) if not s][:5]}  # fmt: skip


@contextmanager
def http_target(args, index: Path, log_dir: Path):
    """``(url, server_cpu_seconds, label)`` of the server the HTTP load goes to; stopped after."""
    if args.url:
        pid = args.server_pid
        yield args.url, (lambda: proc_cpu_seconds(pid)) if pid else (lambda: None), "url"
        return
    if args.original:
        manifest = json.loads((index / "manifest.json").read_text())
        corpus = Path(args.corpus or manifest["corpus"]["path"])
        log(f"checking that {corpus} is {index}'s passages in order")
        check_same_rows(index, corpus)
        server = OriginalServer(Path(args.original), args.original_python, index, corpus,
                                args.original_name, log_dir / "serve-original.log")  # fmt: skip
        label = "original"
    else:
        server = ServerProcess(index, log_dir / f"serve-{index.name}.log")
        label = "searchrl"
    try:
        yield server.url, server.cpu_seconds, label
    finally:
        server.stop()
