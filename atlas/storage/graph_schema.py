"""The Neo4j graph model of the atlas, written down once: labels, properties, relationships, constraints, version.

Global identity nodes (shared by every prompt, MERGEd on their key, never deleted by a prompt re-ingest):

    (:Model {name, source, weights, names})                  name = the model key (`atlas.models.identity`): the
                                                             packaged/tiny/hub name, or "hf-<hash>" of a local
                                                             directory's weights; names: what it was loaded by
    (:Transcoder {id, model, identity, kind, config, names, sources})-[:FOR]->(:Model)
                                                             id = hash of the dictionary's weights and semantic
                                                             config (`atlas.transcoders.identity`, e.g.
                                                             "clt-3fa9c1d2e4b5a6f7"); names / sources: the directory
                                                             names and paths it was ingested from (labels, not key);
                                                             also its dictionary card's figures when measured
                                                             (fvu_mean, l0_mean, dead_fraction, ce_clean, ce_spliced,
                                                             ce_delta, replacement_score, completeness_score,
                                                             feature_nodes_kept, eval_prompts, eval_tokens,
                                                             training_tokens, recipe)
    (:Feature {key, transcoder, layer, index, h, label?, auto_label?, user_label?, user_note?, label_author?,
               label_updated_at?})                           key = "{transcoder}/{layer}/{index}" (graph.feature_key);
                                                             label = user_label if set, else auto_label (what readers
                                                             show; `atlas.storage.labels` keeps it so)
    (:LabelRevision {seq, label, note, author, at, source})-[:REVISES]->(:Feature)
                                                             one per user label write (history; never deleted)
    (:Token {key, model, id, text, h})                       a vocabulary item; key = "{model}/{id}", because token
                                                             ids are only meaningful within one model's vocabulary
                                                             (h: a 31-bit hash of the key, `aggregate.node_hash`)

Per prompt (one attribution graph; all of it replaced when the prompt is ingested again):

    (:Prompt {id, text, tokens, model, transcoder, run, replacement_score, completeness_score,
              n_nodes, n_edges, created_at, ingested_at, schema_version})
    (:FeatureActivation:Instance {prompt_id, node_index, node_id, layer, position, activation, influence})
        -[:OF]->(:Feature)
    (:InputToken:Instance {prompt_id, node_index, node_id, position, token_id, influence})-[:OF]->(:Token)
    (:ErrorNode:Instance {prompt_id, node_index, node_id, layer, position, norm, influence})
    (:LogitTarget:Instance {prompt_id, node_index, node_id, position, token_id, label, probability, logit, influence})
        -[:OF]->(:Token)                                     custom-direction targets (token_id null) have no OF

Aggregate layer (global, summed over all stored prompts; maintained incrementally by the writer, see
`atlas.storage.aggregate` for the exact definitions):

    (:Feature)-[:AGG_EDGE {pair, n_prompts, n_edges, sum_weight_fx, sum_abs_weight_fx, max_abs_weight}]->
        (:Feature | :Token)

`pair` is the relationship's key (`aggregate.pair_key`: `f.h * 2^31 + t.h`), indexed, so an update finds its
relationship by index seek instead of scanning the AGG_EDGE chains of dense Feature and Token nodes. The sums are
fixed point: sum_abs_weight = sum_abs_weight_fx / 2^32 (`aggregate.AGG_VALUES` projects them as floats, with
mean_weight = sum_weight / n_prompts).

Validation layer (`atlas.storage.validations`; causal tests of a circuit, written atomically, never by a prompt
re-ingest; an additive constraint, so no schema version change):

    (:Validation {id, circuit, target, mode, n_prompts, pass_fraction, necessity_zero, sufficiency_frozen_errors,
                  agreement, ...})-[:TESTS]->(:Feature)
    (:Validation)-[:ON {necessity_zero, sufficiency_frozen_errors, necessity_p, sufficiency_p, beats_null, ...}]->
        (:Prompt {agreement})

Corpus-structure layer (`atlas global motifs` / `clusters`; additive constraints, no schema version change; written
only by those commands, never by a prompt re-ingest; see `atlas.storage.motifs` and `atlas.storage.clusters`). Each
dictionary has its own: `transcoder` is its id, and a command mines / clusters / replaces one dictionary's prompts and
nodes only:

    (:Motif {key, transcoder, kind, nodes, source, end, support, total_strength, mean_strength})
        -[:HAS {pos}]->(:Feature | :Token)
    (:Motif)-[:SEEN_IN {strength, n_paths, ingested_at}]->(:Prompt {motifs_at})
    (:MotifRun {name: "motifs/<transcoder>", transcoder, min_strength, max_features, n_prompts})
    (:Cluster {key: "<transcoder>/cluster-<index>", transcoder, index, size, cohesion, features, motifs})
        -[:CONTAINS]->(:Prompt)
    (:Cluster)-[:CHARACTERISED_BY {rank, score}]->(:Feature | :Motif)
    (:ClusterRun {name: "clusters/<transcoder>", transcoder, eps, min_samples, n_neighbours, n_prompts, n_clusters})

Diff layer (`atlas.storage.diffs`; a comparison of two dictionaries, written atomically by `atlas diff`, never by a
prompt re-ingest; an additive constraint `atlas_diff_id`, so no schema version change):

    (:Diff {id, a, b, classification, matched_fraction, mean_similarity, ...})-[:A|B]->(:Transcoder)
    (:Diff)-[:ON {similarity, node_overlap, edge_overlap, ..., exceeds_noise, prompt_b}]->(:Prompt)
    (:Feature)-[:ALIGNS_WITH {diff, decoder_cos, encoder_cos, act_corr, score, method}]->(:Feature)

Edit layer (`atlas.storage.edits`; SHIFT-style feature-set edits and their measured effects, written atomically like
validations; an additive constraint):

    (:Edit {id, operation, value, features, transcoder, model, mode, target_logit_change, accuracy_before,
            accuracy_after, control_kl, control_top1_agreement, ...})-[:EDITS]->(:Feature)
    (:Edit)-[:MEASURED_ON {role: "target" | "control", answer_logit_change, kl, top1_same, ...}]->(:Prompt)

Prompt metadata is free-form besides the required keys; the optional `task` (e.g. "capitals") and `run` are indexed
for the app's overview and filters.

Every instance node also carries the label `:Instance` and has exactly one `-[:IN]->(:Prompt)`. Attribution edges
`(:Instance)-[:EDGE {weight}]->(:Instance)` join instance nodes of the same prompt only, so a path that follows
`:EDGE` never leaves its prompt and needs no per-hop filter. `node_index` is the node's row in the prompt's Arrow node
table (`atlas.attribution.graph.NODE_SCHEMA`), `node_id` its circuit-tracer frontend id; edge weights are the raw
direct effects of `EDGE_SCHEMA`.

Visibility: a prompt graph is written (old version deleted, new one created) in a single transaction, so a reader
sees either the previous complete version or the new complete version of a prompt, never a part of one; every
`(:Prompt)` in the store is complete. See `atlas.storage.neo4j_writer`.

Queries for the Neo4j Browser (anchor on indexed keys):

    // one prompt's graph
    MATCH (p:Prompt {id: $prompt})<-[:IN]-(n) OPTIONAL MATCH (n)-[e:EDGE]->(m) RETURN n, e, m
    // the instance nodes of a prompt by index; `node_index IS NOT NULL` makes the planner use the composite
    // Instance(prompt_id, node_index) index (`{prompt_id: $prompt}` alone would scan every :Instance node)
    MATCH (n:Instance) WHERE n.prompt_id = $prompt AND n.node_index IS NOT NULL RETURN n ORDER BY n.node_index
    // every prompt in which a feature is active, and its strongest outgoing edges there
    MATCH (f:Feature {key: $key})<-[:OF]-(a:FeatureActivation)-[e:EDGE]->(b)
    RETURN a.prompt_id, a.position, a.activation, b.node_id, e.weight ORDER BY abs(e.weight) DESC LIMIT 25
    // the features driving a logit token across prompts (aggregate layer), strongest first
    MATCH (t:Token {key: $token_key})<-[g:AGG_EDGE]-(f:Feature)
    RETURN f.key, g.n_prompts, g.sum_abs_weight_fx / 2.0 ^ 32 AS sum_abs_weight ORDER BY sum_abs_weight DESC LIMIT 25
    // paths of up to 4 strong edges from a feature to the logit targets of the same prompt
    MATCH (f:Feature {key: $key})<-[:OF]-(a:FeatureActivation)
    MATCH p = (a)(()-[r:EDGE WHERE abs(r.weight) > $w]->()){1,4}(t:LogitTarget)
    RETURN a.prompt_id, p LIMIT 50

Constraints and indexes are created (idempotently, `IF NOT EXISTS`) before anything is written. The store records
its model version in a singleton `(:SchemaVersion {name: "circuit-atlas", version})`;
`atlas.storage.migrations.ensure_schema` creates the schema, then upgrades an older store one version at a time
through its `MIGRATIONS` (version k -> k + 1). Version 1 is the first; version 2 added the aggregate layer and the
`Prompt(task)` index (migration 1 -> 2 builds the layer from the stored prompts in one transaction; for a large
store use `GraphWriter(aggregates=False)` loads followed by `atlas.storage.aggregate.rebuild_aggregates`, which
batches); version 3 keys each AGG_EDGE by `pair` (index `atlas_agg_pair`; migration 2 -> 3 sets the key on the
existing layer in one transaction); version 4 gives Features and Tokens their hash `h`, makes `pair` an integer
built from the two hashes and stops storing the float sums (migration 3 -> 4 does all three in one transaction);
version 5 keys each Transcoder by its weights instead of its directory (migration 4 -> 5 can only mark the old,
path-keyed Transcoders `identity: "legacy"`: re-keying them and merging the copies of one dictionary needs the
weights, `atlas db migrate --transcoders DIR...`, see `atlas.storage.identities`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from neo4j import Driver
from neo4j.exceptions import ClientError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 5
STORE_NAME = "circuit-atlas"

# Labels and relationship types (the only places these strings are spelled out besides the Cypher below).
MODEL = "Model"
TRANSCODER = "Transcoder"
FEATURE = "Feature"
TOKEN = "Token"
PROMPT = "Prompt"
INSTANCE = "Instance"
FEATURE_ACTIVATION = "FeatureActivation"
INPUT_TOKEN = "InputToken"
ERROR_NODE = "ErrorNode"
LOGIT_TARGET = "LogitTarget"
SCHEMA_VERSION_LABEL = "SchemaVersion"
REL_OF = "OF"
REL_IN = "IN"
REL_EDGE = "EDGE"
REL_FOR = "FOR"
REL_AGG_EDGE = "AGG_EDGE"
VALIDATION = "Validation"
REL_TESTS = "TESTS"
REL_ON = "ON"
EDIT = "Edit"
REL_EDITS = "EDITS"
REL_MEASURED_ON = "MEASURED_ON"

# Instance label by the `kind` column of NODE_SCHEMA.
INSTANCE_LABELS: Mapping[str, str] = {
    "feature": FEATURE_ACTIVATION,
    "token": INPUT_TOKEN,
    "error": ERROR_NODE,
    "logit": LOGIT_TARGET,
}

# Uniqueness constraints as (name, label, properties); each also gives the range index behind lookups and MERGE.
UNIQUE_KEYS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("atlas_model_name", MODEL, ("name",)),
    ("atlas_transcoder_id", TRANSCODER, ("id",)),
    ("atlas_feature_key", FEATURE, ("key",)),
    ("atlas_token_key", TOKEN, ("key",)),
    ("atlas_prompt_id", PROMPT, ("id",)),
    # Composite; a prompt_id-only lookup uses it with `WHERE n.prompt_id = $p AND n.node_index IS NOT NULL`.
    ("atlas_instance_key", INSTANCE, ("prompt_id", "node_index")),
    ("atlas_schema_version_name", SCHEMA_VERSION_LABEL, ("name",)),
    ("atlas_validation_id", VALIDATION, ("id",)),
    ("atlas_edit_id", EDIT, ("id",)),
)

# Secondary range indexes for the common anchors of read queries, as (name, label, properties). Instance labels get
# none of their own: every extra index on an instance label would slow down every ingest, and per-prompt lookups
# have the composite Instance constraint above.
RANGE_INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("atlas_feature_layer", FEATURE, ("transcoder", "layer", "index")),
    ("atlas_token_id", TOKEN, ("id",)),
    ("atlas_prompt_run", PROMPT, ("run",)),
    ("atlas_prompt_model", PROMPT, ("model",)),
    ("atlas_prompt_task", PROMPT, ("task",)),
    ("atlas_feature_label", FEATURE, ("label",)),
)


# Relationship property indexes, as (name, relationship type, properties).
RELATIONSHIP_INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (("atlas_agg_pair", REL_AGG_EDGE, ("pair",)),)


def _properties(var: str, properties: tuple[str, ...]) -> str:
    inner = ", ".join(f"{var}.{p}" for p in properties)
    return inner if len(properties) == 1 else f"({inner})"


CONSTRAINTS: tuple[str, ...] = tuple(
    f"CREATE CONSTRAINT {name} IF NOT EXISTS FOR (n:{label}) REQUIRE {_properties('n', props)} IS UNIQUE"
    for name, label, props in UNIQUE_KEYS
)
INDEXES: tuple[str, ...] = tuple(
    f"CREATE INDEX {name} IF NOT EXISTS FOR (n:{label}) ON ({', '.join(f'n.{p}' for p in props)})"
    for name, label, props in RANGE_INDEXES
) + tuple(
    f"CREATE INDEX {name} IF NOT EXISTS FOR ()-[r:{rel_type}]-() ON ({', '.join(f'r.{p}' for p in props)})"
    for name, rel_type, props in RELATIONSHIP_INDEXES
)

# Error codes that mean "someone else created this rule first" (concurrent ensure_schema calls).
_ALREADY_EXISTS_CODES = frozenset(
    {
        "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists",
        "Neo.ClientError.Schema.ConstraintAlreadyExists",
        "Neo.ClientError.Schema.IndexAlreadyExists",
        "Neo.ClientError.Schema.ConstraintWithNameAlreadyExists",
        "Neo.ClientError.Schema.IndexWithNameAlreadyExists",
    }
)


def token_key(model: str, token_id: int) -> str:
    """Identity of a vocabulary item: token ids are only meaningful within one model's vocabulary."""
    return f"{model}/{token_id}"


def create_constraints_and_indexes(driver: Driver, database: str = "neo4j", *, timeout_s: float = 300) -> None:
    """Create every constraint and index (idempotent) and wait until all indexes are online."""
    # `IF NOT EXISTS` is a no-op when a rule of that name, or an equivalent rule under another name, exists.
    for statement in (*CONSTRAINTS, *INDEXES):
        try:
            driver.execute_query(statement, database_=database)
        except ClientError as exc:
            if exc.code not in _ALREADY_EXISTS_CODES:
                raise
    driver.execute_query("CALL db.awaitIndexes($timeout)", timeout=int(timeout_s), database_=database)


def read_schema_version(driver: Driver, database: str = "neo4j") -> int | None:
    """The version recorded in the store, or None for a store without a version node."""
    # properties(v) rather than v.version: on a new store the property key does not exist yet, and the server
    # would send an "unknown property key" warning for every start.
    records = driver.execute_query(
        "MATCH (v:SchemaVersion {name: $name}) RETURN properties(v) AS props", name=STORE_NAME, database_=database
    ).records
    return None if not records else int(records[0]["props"]["version"])
