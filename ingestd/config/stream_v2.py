"""The X API v2 keys of the `stream` section (docs/protocol.md §7.2-7.3): rules and field lists."""

from __future__ import annotations

from typing import Any

from ingestd.config.loader import MISSING, Context
from ingestd.config.schema import Rule
from ingestd.config.section import Section
from ingestd.config.values import kind

V2_TWEET_FIELDS = frozenset((
    "attachments", "author_id", "context_annotations", "conversation_id", "created_at",
    "edit_controls", "entities", "geo", "id", "in_reply_to_user_id", "lang", "public_metrics",
    "possibly_sensitive", "referenced_tweets", "reply_settings", "source", "text", "withheld",
    "note_tweet", "edit_history_tweet_ids",
))
V2_EXPANSIONS = frozenset((
    "attachments.poll_ids", "attachments.media_keys", "author_id", "edit_history_tweet_ids",
    "entities.mentions.username", "geo.place_id", "in_reply_to_user_id", "referenced_tweets.id",
    "referenced_tweets.id.author_id",
))
V2_USER_FIELDS = frozenset((
    "created_at", "description", "entities", "id", "location", "most_recent_tweet_id", "name",
    "pinned_tweet_id", "profile_image_url", "protected", "public_metrics", "url", "username",
    "verified", "verified_type", "withheld",
))
V2_PLACE_FIELDS = frozenset((
    "contained_within", "country", "country_code", "full_name", "geo", "id", "name",
    "place_type",
))
# Defaults: enough for created_at as a date, per-author and per-language queries, and geo.
V2_DEFAULTS = {
    "tweet_fields": ("author_id", "created_at", "entities", "geo", "lang", "public_metrics",
                     "referenced_tweets", "conversation_id"),
    "expansions": ("author_id", "geo.place_id"),
    "user_fields": ("created_at", "name", "username"),
    "place_fields": ("country_code", "full_name", "geo", "place_type"),
}
MAX_RULE_LENGTH = 2048  # the largest access level's limit; the server enforces its own
# (access level, rules per app, characters per rule): docs/protocol.md §7.3. Which level an app
# has is not in the settings, so `ingestd check` warns against each (ingestd/tools/instances.py).
V2_ACCESS_LEVELS = (
    ("Essential", 5, 512),
    ("Elevated", 25, 512),
    ("Academic", 1000, 1024),
    ("Pro", 1000, 1024),
    ("Enterprise", 2500, 2048),
)
MAX_TAG_LENGTH = 256


def v2_stream(sec: Section, api: str) -> dict[str, Any]:
    """The v2 keys; with ``api: v1.1`` any of them set is a mistake worth naming."""
    names = ("rules", "tweet_fields", "expansions", "user_fields", "place_fields",
             "backfill_minutes")
    if api != "v2":
        for name in [n for n in names if sec.is_set(n)]:
            sec.error(name, "is an X API v2 key: set stream.api to v2 to use it")
        for name in names:
            sec.get(name)
        return {}
    return {
        "rules": _rules(sec),
        "tweet_fields": _field_list(sec, "tweet_fields", V2_TWEET_FIELDS),
        "expansions": _field_list(sec, "expansions", V2_EXPANSIONS),
        "user_fields": _field_list(sec, "user_fields", V2_USER_FIELDS),
        "place_fields": _field_list(sec, "place_fields", V2_PLACE_FIELDS),
        # 0 = off; 1-5 asks the endpoint to resend the last N minutes after a reconnect.
        "backfill_minutes": sec.integer("backfill_minutes", lo=0, hi=5),
    }


def _field_list(sec: Section, name: str, known: frozenset[str]) -> tuple[str, ...]:
    if sec.get(name) is MISSING:
        return V2_DEFAULTS[name]
    values: list[str] = []
    for path, item in sec.items(name):
        if not isinstance(item, str) or item not in known:
            got = repr(item) if isinstance(item, str) else kind(item)
            sec.ctx.error(path, f"must be one of {', '.join(sorted(known))}; got {got}")
        elif item not in values:
            values.append(item)
    return tuple(values)


def _rules(sec: Section) -> tuple[Rule, ...]:
    items = sec.items("rules")
    if not items:
        sec.error("rules", "v2 needs at least one rule: a list of {value, tag}")
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path, item in items:
        rule = _rule(sec.ctx, path, item)
        if rule is None:
            continue
        if rule.value in seen:
            # The endpoint refuses a second rule with the same value (DuplicateRule).
            sec.ctx.error(f"{path}.value", f"duplicates {seen[rule.value]}.value")
            continue
        seen[rule.value] = path
        rules.append(rule)
    return tuple(rules)


def _rule(ctx: Context, path: str, item: object) -> Rule | None:
    if isinstance(item, str):
        item = {"value": item}
    if not isinstance(item, dict):
        ctx.error(path, f"a rule is a mapping {{value, tag}}, got {kind(item)}")
        return None
    for key in item:
        if key not in ("value", "tag"):
            ctx.error(f"{path}.{key}", "unknown key (known keys: tag, value)")
    value, tag = item.get("value"), item.get("tag")
    ok = True
    if not isinstance(value, str) or not value.strip():
        ctx.error(f"{path}.value", "required: the rule text, e.g. 'cat has:media -is:retweet'")
        ok = False
    elif len(value.strip()) > MAX_RULE_LENGTH:
        ctx.error(f"{path}.value", f"is {len(value.strip())} characters; at most "
                                   f"{MAX_RULE_LENGTH} (the endpoint may allow fewer)")
        ok = False
    if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG_LENGTH):
        ctx.error(f"{path}.tag", f"must be a string of at most {MAX_TAG_LENGTH} characters")
        ok = False
    return Rule(str(value).strip(), tag or None) if ok else None
