"""Attribution graphs: node layout and typed ids, influence-based pruning and graph scores.

The attribution engine itself (local replacement model, batched backward passes, interventions, export) is built
on these pieces in a later issue.
"""
