"""Data path: corpus -> byte-level BPE tokenizer -> tokenized webdataset shards -> resumable token batches.

Modules: `config` (DataConfig), `corpus` (documents and the train/val split), `tokenizer`, `prepare`
(shards + index.json, also a CLI), `stream` (TokenStream, eval_batches).
"""
