"""circuit-atlas: attribution graphs of language models at corpus scale.

Stages, each a subpackage that imports only from the stages before it:
`models` (load a TransformerLens model) → `transcoders` (PLT/CLT definitions, file formats) →
`training` (activation streaming, transcoder training, metrics) → attribution → storage → app.
"""

__version__ = "0.1.0"
