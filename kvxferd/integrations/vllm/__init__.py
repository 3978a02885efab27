"""kvxferd inside vLLM: the KV connector (:mod:`.connector`, loaded by vLLM through
``kv_connector_module_path``), the proxy (:mod:`.proxy`), and what both stand on (:mod:`.plan`,
:mod:`.roles`). Nothing here is imported by ``import kvxferd``: only the connector and the proxy
need vLLM (the vLLM venv, ``make vllm-venv``)."""
