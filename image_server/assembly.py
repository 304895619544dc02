"""The render pipeline as the service runs it, assembled from the config: spend checks, the
result cache and coalescing, the prompt policy, around the plain ``RenderPipeline``."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from image_server.cache.reuse import ResultReuse
from image_server.cache.storage import DiskCacheStorage
from image_server.config import ServiceConfig
from image_server.frugal import FrugalPipeline
from image_server.manager import GeneratorManager
from image_server.prompting.ollama import OllamaCompressor
from image_server.prompting.policy import PromptPolicy
from image_server.spend.guard import SpendGuard
from image_server.spend.ledger import SpendLedger
from image_server.storage import OutputStore


async def frugal_pipeline(
    config: ServiceConfig,
    manager: GeneratorManager,
    store: OutputStore,
    http_client: httpx.AsyncClient,
    stack: contextlib.AsyncExitStack,
) -> FrugalPipeline:
    """The pipeline with spend checks, the result cache and coalescing; what needs closing
    (the prompt compressor's client) goes on ``stack``."""
    ledger = SpendLedger(config.state_dir / "spend.json", config.spend.budgets)
    await asyncio.to_thread(ledger.load)
    storage = None
    if config.cache.enabled:
        storage = DiskCacheStorage(
            config.state_dir / "cache",
            max_bytes=config.cache.max_bytes,
            max_age_s=config.cache.max_age_s,
            memory_bytes=config.cache.memory_bytes,
        )
        await storage.open()
    prompts = PromptPolicy(config.prompting)
    if prompts.needs_compressor():
        prompts.compressor = OllamaCompressor(config.prompting.ollama)
        stack.push_async_callback(prompts.compressor.aclose)
    return FrugalPipeline(
        manager,
        store,
        config.references,
        spend=SpendGuard(config.spend, ledger, lambda name: manager.config(name).strategy),
        reuse=ResultReuse(storage, store, default_project=config.default_project),
        cache=config.cache,
        prompts=prompts,
        hedging=config.hedging,
        default_project=config.default_project,
        http_client=http_client,
    )
