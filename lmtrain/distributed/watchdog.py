"""A rank that stops answering ends the whole job within `strategy.peer_timeout_s`.

A rank that dies on another node (a node lost, a process frozen, a network partition) leaves the
others blocked in their next collective until the collective timeout (strategy.timeout_s, 30 min by
default: NCCL notices no closed socket). Here every rank's thread bumps a heartbeat counter in the
job's c10d store (the one torch.distributed rendezvoused through) every few seconds and watches the
others'. A peer whose counter has not moved for peer_timeout_s, or a store that stopped answering
for as long (the process hosting it, rank 0, is gone), makes the rank print who went silent and
exit non-zero at once, so the launcher and the scheduler see the job fail and can requeue it.

A rank that fails with an exception says so in the store, and the others end within one heartbeat
interval; a rank that ends training cleanly says so before its thread stops, so a slow last
checkpoint on rank 0 is never mistaken for a death.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import lightning as L
import torch.distributed as dist

KEY = "lmtrain/heartbeat"


class PeerWatchdog(L.Callback):
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.interval_s = max(0.5, min(5.0, timeout_s / 6))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None
        self._clean = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._thread is not None or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() < 2:
            return
        store = self._store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"{KEY}/host/{rank}", f"{socket.gethostname()} pid {os.getpid()}")
        self._thread = threading.Thread(target=self._watch, args=(store, rank, world), name="lmtrain-peer-watchdog",
                                        daemon=True)
        self._thread.start()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clean = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if self._store is None or isinstance(exception, (SystemExit, KeyboardInterrupt, SIGTERMException)):
            return  # an orderly stop (requeue, SIGTERM, Ctrl-C) that every rank makes together
        try:
            self._store.set(f"{KEY}/failed/{dist.get_rank()}", f"{type(exception).__name__}: {str(exception)[:200]}")
        except Exception:
            pass

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _watch(self, store, rank: int, world: int) -> None:
        peers = [r for r in range(world) if r != rank]
        last_seen = {r: (None, time.monotonic()) for r in peers}  # (counter, when it last changed)
        store_ok_since = time.monotonic()
        beat = 0
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                beat += 1
                store.set(f"{KEY}/{rank}", str(beat))
                for peer in peers:
                    if store.check([f"{KEY}/failed/{peer}"]):
                        self._end(f"rank {peer} ({self._host(store, peer)}) failed: "
                                  f"{store.get(f'{KEY}/failed/{peer}').decode()}")
                    if store.check([f"{KEY}/done/{peer}"]):
                        last_seen[peer] = ("done", now)
                        continue
                    value = store.get(f"{KEY}/{peer}") if store.check([f"{KEY}/{peer}"]) else None
                    if value != last_seen[peer][0]:
                        last_seen[peer] = (value, now)
                store_ok_since = now
            except Exception as e:  # the store's host (rank 0's process) is gone, or the network
                if now - store_ok_since > self.timeout_s:
                    self._end(f"the job's rendezvous store (held by rank 0) has not answered for "
                              f"{now - store_ok_since:.0f} s ({type(e).__name__}: {str(e)[:120]})")
                continue
            silent = [(peer, now - since) for peer, (value, since) in last_seen.items()
                      if value != "done" and now - since > self.timeout_s]
            if silent:
                peer, seconds = silent[0]
                self._end(f"rank {peer} ({self._host(store, peer)}) has not been heard from for {seconds:.0f} s: it "
                          "died, froze or lost the network")
        if self._clean:  # the others must not take this rank's silence for a death
            try:
                store.set(f"{KEY}/done/{rank}", "1")
            except Exception:
                pass

    @staticmethod
    def _host(store, peer: int) -> str:
        try:
            return store.get(f"{KEY}/host/{peer}").decode()
        except Exception:
            return "host unknown"

    def _end(self, why: str) -> None:
        print(f"lmtrain: error: {why} (strategy.peer_timeout_s={self.timeout_s:g}); ending rank {dist.get_rank()} "
              f"(pid {os.getpid()}) now rather than waiting in a collective for strategy.timeout_s; the run resumes "
              "from its last checkpoint", file=sys.stderr, flush=True)
        os._exit(1)
