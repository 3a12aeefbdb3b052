"""Generation streaming into scoring: one offline iteration's generate and score stages at once.

Engines and scorers are held side by side (cluster.schedule, rayalign.cluster.schedule). Each finished samples
shard is written and read back as the barrier schedule would read it; whole scoring shards are cut from the
samples in order, at the same row boundaries as the barrier schedule cuts the finished dataset, so every
forward batch, and so every score, is the same. Rewards need every row (anchors, centroids, alpha search) and
are computed when the last shard is scored, by the barrier schedule's code (rayalign.scoring.finish). An interrupted stream resumes from
the verified samples shards and forward checkpoints, under either schedule.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path

import pyarrow as pa
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rayalign.config import RunConfig
from rayalign.generation import FailedRowsError
from rayalign.progress import console


class ScoringCuts:
    """Cuts samples shards, which arrive in any order, into the scoring shards that `split_shards(kept, size)`
    makes of the whole samples dataset: `size` rows each in sample order, the last one shorter.

    With `drop` (a function of a table -> (kept rows, dropped prompt ids), per prompt), rows are cut only once
    every row of their prompt has arrived (`last_shard`: prompt_id -> the last samples shard holding its rows),
    and `drop` sees whole prompts; samples are in prompt_id order (load_prompts), so such rows are a prefix.
    """

    def __init__(self, size: int, drop=None, last_shard: dict | None = None):
        self.size, self.drop, self.last_shard = size, drop, last_shard
        self.next_sample_shard, self.next_cut, self.kept_rows = 0, 0, 0
        self.arrived: dict[int, pa.Table] = {}
        self.unsettled: list[pa.Table] = []  # in order; some prompt in them is not complete yet
        self.buffer: list[pa.Table] = []  # settled, not yet cut
        self.dropped: list = []

    def add(self, index: int, samples: pa.Table) -> list[tuple[int, pa.Table]]:
        """The scoring shards that samples shard `index` completes."""
        self.arrived[index] = samples
        while self.next_sample_shard in self.arrived:
            self.unsettled.append(self.arrived.pop(self.next_sample_shard))
            self.next_sample_shard += 1
        self._settle(final=False)
        return self._cut(final=False)

    def finish(self) -> list[tuple[int, pa.Table]]:
        """The last, shorter scoring shard, once every samples shard has arrived."""
        assert not self.arrived, "samples shards are missing before the ones that arrived"
        self._settle(final=True)
        return self._cut(final=True)

    def _settle(self, final: bool) -> None:
        table = pa.concat_tables(self.unsettled) if self.unsettled else None
        if table is None or not table.num_rows:
            return
        settled = table.num_rows
        if self.drop is not None and not final:
            ids = table.column("prompt_id").to_pylist()
            settled = next((i for i, p in enumerate(ids) if self.last_shard[p] >= self.next_sample_shard), len(ids))
        head = table.slice(0, settled)
        self.unsettled = [table.slice(settled)] if settled < table.num_rows else []
        if self.drop is not None and head.num_rows:
            head, dropped = self.drop(head)
            self.dropped += dropped
        if head.num_rows:
            self.buffer.append(head)
            self.kept_rows += head.num_rows

    def _cut(self, final: bool) -> list[tuple[int, pa.Table]]:
        rows = sum(t.num_rows for t in self.buffer)
        if not rows or (rows < self.size and not final):
            return []
        table = pa.concat_tables(self.buffer)
        out = []
        start = 0
        while table.num_rows - start >= self.size or (final and start < table.num_rows):
            out.append((self.next_cut, table.slice(start, self.size)))
            self.next_cut += 1
            start += self.size
        self.buffer = [table.slice(start)] if start < table.num_rows else []
        return out


def scoring_prompts(cfg: RunConfig, prompts: pa.Table):
    """A function adding what `with_scoring_prompts` adds to the whole samples table to one scoring shard: ICR's
    cross-lingual prompt G(x) takes the anchor-language instruction of each prompt_id, from the prompts here."""
    from rayalign.scoring.rewards import cross_lingual_messages

    if not (cfg.rewards.implicit.enabled and cfg.rewards.implicit.prompt == "cross_lingual"):
        return lambda shard: shard
    columns = ["prompt_id", "lang", "messages"]
    anchor_rows = [r for r in prompts.select(columns).to_pylist() if r["lang"] == cfg.anchor_language]

    def add(shard: pa.Table) -> pa.Table:
        rows = shard.select(columns).to_pylist()
        messages = cross_lingual_messages(pa.Table.from_pylist(rows + anchor_rows), cfg.anchor_language)
        return shard.append_column("messages_cross_lingual", pa.array(messages[:shard.num_rows]))

    return add


def generate_score_stage(cfg: RunConfig, prompts, policy_path: str, policy_name: str, iteration: int,
                         it_dir: Path, hub_layer: int | None = None) -> tuple[dict, dict]:
    """Samples at it_dir/samples and scores at it_dir/scores, scoring while generating: (generate result, score
    result), each with its wall_seconds (score: the time the iteration waited for scoring after generation)."""
    import pyarrow.parquet as pq

    from rayalign.actors.generator import GenerationGroup
    from rayalign.actors.pool import split_shards
    from rayalign.actors.pool import ShardFeed
    from rayalign.actors.scorer import ScoringGroup
    from rayalign.anchor_groups import anchor_rows_before_scoring, drop_prompts_without_anchor
    from rayalign.data.store import shard_name
    from rayalign.failures import errors_checkpoint, record_failures
    from rayalign.run_dir import checkpoint, read_checkpoints, report_untrusted, samples_writer
    from rayalign.scoring.finish import finish_scores, stage_centroids
    from rayalign.scoring.setup import scoring_setup

    started = time.perf_counter()
    e, r, n = cfg.engines, cfg.rewards, cfg.sampling.n
    samples_dir, out_dir = it_dir / "samples", it_dir / "scores"
    prompt_shards = split_shards(prompts, e.shard_rows)
    writer = samples_writer(cfg, samples_dir, policy_name, iteration)
    done = {i for i in range(len(prompt_shards)) if writer.has_shard(i)}
    report_untrusted(writer.rejected)
    roles, specs, reward_model, layers = scoring_setup(cfg, policy_path, hub_layer)
    score_rows = e.shard_rows * n
    most_samples = prompts.num_rows * n
    forward_dir = out_dir.with_name(out_dir.name + ".forward")
    results = read_checkpoints(forward_dir, math.ceil(most_samples / score_rows))
    gen_errors, gen_may_fail = errors_checkpoint(cfg, it_dir, "generate", done, prompts.num_rows)
    score_errors, score_may_fail = errors_checkpoint(cfg, it_dir, "score", set(results), most_samples)

    anchor, before = cfg.anchor_language, anchor_rows_before_scoring(cfg)
    # as score_stage: ICR's cross-lingual prompt needs the anchor prompt before the forward pass, so a prompt
    # whose anchor rows all failed is dropped before scoring; latent rewards check after it
    drop, last_shard = None, None
    if before:
        last_shard = {pid: i // e.shard_rows for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
        drop = lambda table: drop_prompts_without_anchor(table, anchor, before)  # noqa: E731
    cuts, feed, with_prompts = ScoringCuts(score_rows, drop, last_shard), ShardFeed(), scoring_prompts(cfg, prompts)

    def feed_scoring(cut: list[tuple[int, pa.Table]]) -> None:
        for index, shard in cut:
            if index not in results:
                feed.put(index, with_prompts(shard))

    def on_samples(index: int, table: pa.Table) -> None:  # scorers read the shard as written, as the barrier does
        path = writer.write_shard(index, table)
        if "error" in scoring:  # the scorers stopped: generating the rest would only delay the error
            raise scoring["error"]
        feed_scoring(cuts.add(index, pq.read_table(path)))

    for index in sorted(done):
        feed_scoring(cuts.add(index, pq.read_table(samples_dir / shard_name(index))))

    scoring: dict = {}
    # both groups shut down however the stage ends, also when the scorers fail to start after the engines did
    with contextlib.ExitStack() as stack:
        engines = stack.enter_context(GenerationGroup(policy_path, cfg.policy, e))
        scorers = stack.enter_context(ScoringGroup.for_recipe(roles, r))
        bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(),
                                           TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console))
        resumed_rows = sum(prompt_shards[i].num_rows for i in done)
        gen_task = bar.add_task(f"generate iter-{iteration}", total=prompts.num_rows, completed=resumed_rows,
                                status=f"{resumed_rows}/{prompts.num_rows} rows")
        score_task = bar.add_task(f"score iter-{iteration} (streamed)", total=None, status="waiting for samples")

        def gen_progress(stats):
            rows = resumed_rows + stats.rows_in
            bar.update(gen_task, completed=rows, status=f"{rows}/{prompts.num_rows} rows | "
                       f"{stats.rows_out / max(stats.seconds, 1e-9):.1f} rows out/s")

        def score_progress(stats):
            bar.update(score_task, status=f"{stats.rows_in} samples scored | "
                       f"{stats.rows_in / max(stats.seconds, 1e-9):.1f} samples/s")

        def score_all():
            try:
                scoring["stats"] = scorers.run(feed, specs, reward_model, checkpoint(forward_dir, results),
                                               skip=set(results), progress=score_progress, on_errors=score_errors,
                                               max_failed_rows=score_may_fail)
                scoring["nodes"] = scorers.nodes()
            except BaseException as error:  # noqa: BLE001 - raised in the driver's thread below
                scoring["error"] = error

        thread = threading.Thread(target=score_all, name="streamed-scoring", daemon=True)
        thread.start()
        try:
            try:
                gen_stats = engines.run(prompt_shards, cfg.sampling, iteration, policy_name, on_samples, skip=done,
                                        progress=gen_progress, on_errors=gen_errors, max_failed_rows=gen_may_fail)
                gen_nodes = engines.nodes()
            except FailedRowsError:
                record_failures(cfg, it_dir, iteration, "generate", prompts.num_rows)
                raise
            finally:
                engines.shutdown()  # frees the engines' share of the cluster while scoring finishes
            feed_scoring(cuts.finish())
            feed.close()
            gen_failed = record_failures(cfg, it_dir, iteration, "generate", prompts.num_rows)
            manifest = writer.finalize(expected_shards=len(prompt_shards))
            generated = time.perf_counter()
            thread.join()
            if "error" not in scoring:  # on the scorers, before they go: rewards.latent.centroid_texts
                centroids = stage_centroids(cfg, scorers, layers)
        except BaseException as error:
            feed.abort(error)
            thread.join(timeout=60)
            if error is scoring.get("error") and isinstance(error, FailedRowsError):
                record_failures(cfg, it_dir, iteration, "score", prompts.num_rows * cfg.sampling.n)
            raise
    if "error" in scoring:
        if isinstance(scoring["error"], FailedRowsError):
            record_failures(cfg, it_dir, iteration, "score", manifest["rows"])
        raise scoring["error"]
    stats = scoring["stats"]
    score_failed = record_failures(cfg, it_dir, iteration, "score", manifest["rows"])
    table, fields = finish_scores(cfg, results, cuts.next_cut, out_dir, iteration, roles, layers, centroids,
                                  cuts.dropped, manifest["rows"] - cuts.kept_rows)
    tokens = sum(table.column("score_tokens").to_pylist()) * len(specs)
    generate = {
        "rows": prompts.num_rows, "samples": manifest["rows"], "new_samples": gen_stats.rows_out,
        "failed_rows": gen_failed, "resumed_shards": len(done), "retries": gen_stats.retries,
        "seconds": round(gen_stats.seconds, 3), "samples_per_s": round(gen_stats.rows_out / max(gen_stats.seconds,
                                                                                                1e-9), 2),
        "tokens_per_s": round(gen_stats.tokens / max(gen_stats.seconds, 1e-9), 2), "actor_nodes": gen_nodes,
        "schedule": "stream", "wall_seconds": round(generated - started, 3)}
    score = {
        **fields, "forward_passes": len(specs), "retries": stats.retries, "failed_rows": score_failed,
        "resumed_shards": stats.skipped_shards, "actor_nodes": scoring["nodes"], "seconds": round(stats.seconds, 3),
        "tokens_per_s": round(tokens / max(stats.seconds, 1e-9), 2), "schedule": "stream",
        "wall_seconds": round(time.perf_counter() - generated, 3)}
    return generate, score
