"""Prometheus metrics for gcrootsd: a textfile-collector file (the default,
no network needed: node_exporter reads it) or a local HTTP port.

Updated after every analysis and collection, and on --metrics-interval.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server, write_to_textfile

from gcroots import log

_log = log.get("gcroots.daemon")


class Metrics:
    def __init__(self, textfile: str | None = None, address: str | None = None) -> None:
        self.textfile = textfile
        r = self.registry = CollectorRegistry()
        self.roots = Gauge("gcroots_roots", "GC roots in the last complete scan, by kind",
                           ["kind"], registry=r)
        self.live_paths = Gauge("gcroots_live_paths", "Live store paths", registry=r)
        self.live_bytes = Gauge("gcroots_live_nar_bytes", "NAR size of the live paths", registry=r)
        self.dead_paths = Gauge("gcroots_dead_paths", "Store entries that are garbage", registry=r)
        self.dead_bytes = Gauge("gcroots_dead_nar_bytes", "NAR size of the dead valid paths",
                                registry=r)
        self.scan_seconds = Gauge("gcroots_scan_seconds", "Duration of the last root scan",
                                  registry=r)
        self.analysis_seconds = Gauge("gcroots_analysis_seconds",
                                      "Duration of the last analysis (scan included)", registry=r)
        self.gc_seconds = Gauge("gcroots_gc_seconds", "Duration of the last collection", registry=r)
        self.gc_freed = Counter("gcroots_gc_freed_bytes", "Bytes freed on disk by collections "
                                "(blocks; hard links counted once)", registry=r)
        self.gc_deleted = Counter("gcroots_gc_deleted_paths", "Store paths deleted", registry=r)
        self.failures = Counter("gcroots_failures", "Failed scans and collections", ["what"],
                                registry=r)
        self.last_success = Gauge("gcroots_last_success_timestamp_seconds",
                                  "Time of the last successful analysis or collection", ["what"],
                                  registry=r)
        for what in ("analysis", "gc"):
            self.failures.labels(what)
        self.scan_failures = Counter(
            "gcroots_root_scan_failures", "Failed root scans (once per scan, however many "
            "queries waited for it), by the owner of the root entry that failed it, if any",
            ["owner"], registry=r)
        self.dropped = Counter("gcroots_connections_dropped", "Client connections ended without "
                               "an answer: over a limit, protocol errors, no request in time, "
                               "hung up", ["reason"], registry=r)
        self.write_failures = Counter("gcroots_metrics_write_failures",
                                      "Failed writes of the metrics file", registry=r)
        self._write_failing = False
        if address:
            host, _, port = address.rpartition(":")
            start_http_server(int(port), addr=host or "127.0.0.1", registry=r)

    def analysis(self, a, live_bytes: int | None, dead_bytes: int | None) -> None:
        counts: dict[str, int] = {}
        for kind, _, _ in a.roots:
            counts[kind.name.lower()] = counts.get(kind.name.lower(), 0) + 1
        for kind in ("static", "indirect", "profile", "runtime", "temp"):
            self.roots.labels(kind).set(counts.get(kind, 0))
        self.live_paths.set(a.live_count())
        if live_bytes is not None:
            self.live_bytes.set(live_bytes)
        if a.computed_dead:
            self.dead_paths.set(a.dead_count())
            if dead_bytes is not None:
                self.dead_bytes.set(dead_bytes)
        self.scan_seconds.set(a.timings.get("scan", 0.0))
        self.analysis_seconds.set(a.timings.get("total", 0.0))
        self.last_success.labels("analysis").set(time.time())
        self.write()

    def collection(self, result) -> None:
        self.gc_seconds.set(result.seconds)
        if not result.dry_run:
            self.gc_freed.inc(result.disk_bytes_freed)
            self.gc_deleted.inc(result.paths)
            self.last_success.labels("gc").set(time.time())
        self.write()

    def failure(self, what: str) -> None:
        self.failures.labels(what).inc()
        self.write()

    def scan_failed(self, owner: str) -> None:
        self.scan_failures.labels(owner).inc()
        self.failure("analysis")

    def write(self) -> None:
        """Never fails a query: a file we cannot write is said once (and
        again once it works), and counted."""
        if not self.textfile:
            return
        try:
            os.makedirs(os.path.dirname(self.textfile) or ".", exist_ok=True)
            write_to_textfile(self.textfile, self.registry)  # atomic: temp file + rename
        except OSError as e:
            self.write_failures.inc()
            if not self._write_failing:
                _log.error("metrics_write_failed", path=self.textfile, error=e.strerror or str(e),
                           file=e.filename, consequence="this file goes stale; serving goes on")
            self._write_failing = True
        else:
            if self._write_failing:
                _log.info("metrics_write_recovered", path=self.textfile)
            self._write_failing = False
