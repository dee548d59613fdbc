"""Causal validation of circuits: batched interventions over the replacement model (`engine`), necessity,
sufficiency, matched null controls and attribution agreement (`validate`), and their statistics (`stats`).

Sits after `atlas.attribution` and before `atlas.storage`: it imports models, transcoders and attribution only,
and neither reads nor writes a store.
"""
