"""Data path: corpus -> byte-level BPE tokenizer -> tokenized webdataset shards -> resumable token batches.

Modules: `config` (DataConfig), `sources` (text, JSONL, parquet readers and bad-input accounting),
`corpus` (documents and the train/val split), `tokenizer`, `prepare` (shards + index.json, also a CLI),
`index_file` (what an index.json may name: plain file names, a sha256 per shard), `shards` (open and decode
one shard from a path or URL, corrupt-shard detection), `stream` (TokenStream, StreamLoader, eval_batches),
`mixture` (weighted corpora), `external` (index foreign shards), `bench` (loader throughput).
"""
