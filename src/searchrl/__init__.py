"""searchrl: train language models to reason and call a search engine with RL (Search-R1).

The package is organised by stage: ``data`` (corpora, QA sets, the synthetic world), ``retrieval``
(BM25 / dense / hybrid search engines, index files, the HTTP server and client), ``rollout``
(generation backends and the multi-turn search loop), ``rewards``, ``algos`` (advantage estimators
and losses), ``training`` (the RL trainer), ``eval`` (benchmarks and baselines) and ``report``.
"""

__version__ = "0.1.0"
