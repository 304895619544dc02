"""The single-process tests that describe what a client sees, run against a gateway and a
worker around a real nats-server (this folder's ``service_factory``): distributed mode must
not change the protocol, the refusals or what stays secret. (Tests that look inside the
single process, at its scheduler or its table of active requests, have cluster versions
in test_cluster_control.py instead.)"""

from __future__ import annotations

from tests.test_secrets import test_a_planted_key_appears_nowhere
from tests.test_service import (
    test_bad_input_gets_an_error_or_is_counted_and_service_keeps_serving,
    test_cancel_unknown_request_is_harmless,
    test_capabilities_refused_with_unsupported,
    test_duplicate_in_flight_request_renders_once,
    test_frames_delivery_sends_raw_bytes,
    test_generation_failure_and_internal_error_are_reported,
    test_image_to_image_uses_the_reference,
    test_inline_delivery_carries_the_image,
    test_reply_to_topics_reach_only_their_client,
    test_request_timeout,
    test_single_frame_compatibility_forms,
    test_text_to_image_file_delivery,
    test_url_delivery_without_provider_url_gives_file_uri,
)

__all__ = [
    "test_a_planted_key_appears_nowhere",
    "test_bad_input_gets_an_error_or_is_counted_and_service_keeps_serving",
    "test_cancel_unknown_request_is_harmless",
    "test_capabilities_refused_with_unsupported",
    "test_duplicate_in_flight_request_renders_once",
    "test_frames_delivery_sends_raw_bytes",
    "test_generation_failure_and_internal_error_are_reported",
    "test_image_to_image_uses_the_reference",
    "test_inline_delivery_carries_the_image",
    "test_reply_to_topics_reach_only_their_client",
    "test_request_timeout",
    "test_single_frame_compatibility_forms",
    "test_text_to_image_file_delivery",
    "test_url_delivery_without_provider_url_gives_file_uri",
]
