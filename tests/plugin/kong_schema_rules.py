"""Kong 3.9.3's rules for a plugin schema and for a plugin config, as Kong states them.

Written from Kong's source (tag 3.9.3), not from pgwshard's code, so the plugin's schema can be
judged by something it did not write: each rule names the Kong file (and function) it comes from.
`schema_errors(schema)` is what Kong does to the `Schema` of `--dump` when it starts
(kong/db/schema/plugin_loader.lua load_subschema: MetaSchema.MetaSubSchema:validate, then
Entity.new_subschema); any error stops Kong. `config_errors(schema, config)` is what Kong does to
a plugin entity's `config` (kong/db/schema/init.lua: process_auto_fields "insert", then
Schema:validate of the record). Both return a list of "path: message" strings, empty when valid.

Lua patterns (`match`, `not_match`, `match_*`) and `custom_validator` functions are not
interpreted: a schema using them is reported, so the checker never passes what it cannot judge.
"""
from __future__ import annotations

import copy
import math
from typing import Any

# kong/db/schema/init.lua Schema.valid_types
VALID_TYPES = {"array", "set", "string", "number", "boolean", "integer", "foreign", "map", "record",
               "function", "json"}

# kong/db/schema/metaschema.lua `validators`: attribute -> the kind of value it takes
VALIDATOR_ATTRIBUTES = {
    "between": "number_pair", "eq": "any", "ne": "any", "gt": "number", "len_eq": "integer",
    "len_min": "integer", "len_max": "integer", "match": "string", "not_match": "string",
    "match_all": "match_list", "match_none": "match_list", "match_any": "match_any",
    "starts_with": "string", "one_of": "array", "not_one_of": "array", "contains": "any",
    "is_regex": "boolean", "timestamp": "boolean", "uuid": "boolean", "custom_validator": "function",
    "mutually_exclusive_subsets": "array",
}
# kong/db/schema/metaschema.lua `field_schema` (attributes that are not validators), plus the
# recursive ones it inserts after (elements, keys, values, fields, entity_checks, shorthand_fields)
OTHER_ATTRIBUTES = {
    "type": "string", "required": "boolean", "reference": "string", "description": "description",
    "examples": "array", "auto": "boolean", "unique": "boolean", "unique_across_ws": "boolean",
    "on_delete": "on_delete", "default": "self", "abstract": "boolean", "generate_admin_api": "boolean",
    "immutable": "boolean", "err": "string", "encrypted": "boolean", "referenceable": "boolean",
    "json_schema": "table", "transient": "boolean", "deprecation": "table",
    "elements": "field", "keys": "field", "values": "field", "fields": "fields",
    "entity_checks": "entity_checks", "shorthand_fields": "array",
}
# kong/db/schema/metaschema.lua `required_attributes`
REQUIRED_ATTRIBUTES = {"array": ["elements"], "set": ["elements"], "map": ["keys", "values"],
                       "record": ["fields"], "json": ["json_schema"]}
# kong/db/schema/metaschema.lua `attribute_types`: attribute -> the field types that may carry it
ATTRIBUTE_TYPES = {
    "between": {"integer", "number"}, "len_eq": {"array", "set", "string", "map"}, "match": {"string"},
    "one_of": {"string", "number", "integer"}, "contains": {"array", "set"}, "is_regex": {"string"},
    "timestamp": {"number", "integer"}, "uuid": {"string"},
    "unique": {"string", "number", "integer", "foreign"},
    "unique_across_ws": {"string", "number", "integer", "foreign"},
    "abstract": {"string", "number", "integer", "record", "array", "set", "map"},
    "json_schema": {"json"}, "transient": {"string", "number", "integer", "array", "set", "boolean"},
}
# kong/db/schema/metaschema.lua `entity_checkers` (names; init.lua Schema.entity_checkers runs them)
ENTITY_CHECKERS = {"at_least_one_of", "conditional_at_least_one_of", "only_one_of", "distinct",
                   "conditional", "custom_entity_check", "mutually_required", "mutually_exclusive",
                   "mutually_exclusive_sets"}
# kong/db/schema/metaschema.lua MetaSubSchema: the top-level keys a plugin schema may have
SUBSCHEMA_KEYS = {"name", "fields", "entity_checks", "shorthand_fields", "transformations", "check"}
# kong/db/schema/entities/plugins.lua: the plugin entity's fields and their types; a plugin
# schema may only specialise these (init.lua Schema.new_subschema SUBSCHEMA_BAD_FIELD), keeping
# their type (compatible_fields; a set's or array's elements keep theirs too)
PLUGIN_ENTITY_FIELDS = {"id": "string", "name": "string", "instance_name": "string",
                        "created_at": "integer", "updated_at": "integer", "route": "foreign",
                        "service": "foreign", "consumer": "foreign", "config": "record",
                        "protocols": "set", "enabled": "boolean", "tags": "set"}
# kong/constants.lua PROTOCOLS (protocols_with_subsystem: typedefs.protocol's one_of, the
# entity's `protocols` elements); ws/wss are Enterprise-only, not in 3.9.3's OSS list
KONG_PROTOCOLS = {"http", "https", "tcp", "tls", "tls_passthrough", "udp", "grpc", "grpcs"}
UNINTERPRETED = {"match", "not_match", "match_all", "match_none", "match_any", "custom_validator",
                 "is_regex", "json_schema", "uuid"}


# --- the field validator: kong/db/schema/init.lua Schema:validate_field -----------------------

def _is_sequence(value: Any) -> bool:
    # init.lua is_sequence: a JSON array (an empty one included) is a Lua sequence
    return isinstance(value, list)


def _is_reference(value: str) -> bool:
    # kong/pdk/vault.lua is_reference: "{vault://...}"
    return value.startswith("{vault://") and value.endswith("}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_field(field: dict, value: Any) -> str | None:
    """init.lua Schema:validate_field: None when `value` is valid for `field`, else Kong's message."""
    if value is None:  # ngx.null: only `required` (and eq/ne null) refuse it
        return "required field missing" if field.get("required") else None
    kind = field.get("type")
    if kind in ("array", "set"):
        if not _is_sequence(value):
            return "expected an array" if kind == "array" else "expected a set"
        # init.lua validate_elements: every element is required (no null inside)
        elements = dict(field["elements"], required=True)
        for i, element in enumerate(value):
            if (error := validate_field(elements, element)) is not None:
                return f"[{i + 1}]: {error}"
    elif kind == "map":
        if not isinstance(value, dict):
            return "expected a map"
        for k, v in value.items():
            error = validate_field(dict(field["keys"], required=True), k) or \
                validate_field(dict(field["values"], required=True), v)
            if error:
                return error
    elif kind == "record":
        if not isinstance(value, dict):
            return "expected a record"
        errors = _record_errors(field, _with_defaults(field, value), "")
        if errors:
            return "; ".join(errors)
    elif kind == "integer":
        if not (_is_number(value) and math.isfinite(value) and value == int(value)):
            return "expected an integer"
    elif kind == "string":
        if not isinstance(value, str):
            return "expected a string"
        # init.lua: "empty strings are not accepted by default": len_min defaults to 1
        field = dict(field, len_min=field.get("len_min", 1))
        if field.get("referenceable") and _is_reference(value):
            return None  # a reference is resolved later (process_auto_fields), not validated
    elif kind == "number":
        if not _is_number(value):
            return "expected a number"
    elif kind == "boolean":
        if not isinstance(value, bool):
            return "expected a boolean"
    elif kind in ("foreign", "function", "json"):
        return f"type {kind} is not interpreted by this checker"
    else:
        return f"invalid type: {kind}"
    # init.lua Schema.validators, in Schema.validators_order
    if "eq" in field and value != field["eq"]:
        return f"value must be {field['eq']}"
    if "ne" in field and value == field["ne"]:
        return f"value must not be {field['ne']}"
    if "not_one_of" in field and value in field["not_one_of"]:
        return f"must not be one of: {', '.join(map(str, field['not_one_of']))}"
    if "one_of" in field and value not in field["one_of"]:
        return f"expected one of: {', '.join(map(str, field['one_of']))}"
    if "gt" in field and not value > field["gt"]:
        return f"value must be greater than {field['gt']}"
    if "timestamp" in field and not value > 0:
        return "expected a valid timestamp"
    if "between" in field and not field["between"][0] <= value <= field["between"][1]:
        return f"value should be between {field['between'][0]} and {field['between'][1]}"
    length = len(value) if isinstance(value, (str, list, dict)) else None
    if "len_eq" in field and length != field["len_eq"]:
        return f"length must be {field['len_eq']}"
    if "len_min" in field and length is not None and length < field["len_min"]:
        return f"length must be at least {field['len_min']}"
    if "len_max" in field and length is not None and length > field["len_max"]:
        return f"length must be at most {field['len_max']}"
    if "starts_with" in field and not value.startswith(field["starts_with"]):
        return f"should start with: {field['starts_with']}"
    if "contains" in field and field["contains"] not in value:
        return f"expected to contain: {field['contains']}"
    if uninterpreted := sorted(UNINTERPRETED & set(field)):
        return f"{uninterpreted} not interpreted by this checker"
    return None


# --- a record's config: init.lua process_auto_fields ("insert") + Schema:validate -----------

def _fields(record: dict) -> list[tuple[str, dict]]:
    return [next(iter(item.items())) for item in record.get("fields", [])]


def _with_defaults(record: dict, value: dict) -> dict:
    """init.lua process_auto_fields, context "insert": a missing field takes a copy of its
    default (handle_missing_field), a missing record is expanded for its own defaults, a field
    with neither stays null; a set loses duplicates (make_set)."""
    data = dict(value)
    for name, field in _fields(record):
        if name not in data:
            if "default" in field:
                data[name] = copy.deepcopy(field["default"])
            elif field.get("type") == "record" and field.get("required"):
                data[name] = _with_defaults(field, {})
            else:
                data[name] = None
        elif field.get("type") == "set" and isinstance(data[name], list):
            data[name] = list(dict.fromkeys(map(_hashable, data[name])))
    return data


def _hashable(value: Any) -> Any:
    return value if not isinstance(value, (list, dict)) else repr(value)


def _is_nonempty(value: Any) -> bool:
    # init.lua is_nonempty
    return value not in (None, "") and value != [] and value != {}


def _record_errors(record: dict, data: dict, path: str) -> list[str]:
    """init.lua Schema:validate on a record: validate_fields (an unknown key is an error), then
    `required` fields, then the entity checks."""
    specs = dict(_fields(record))
    by_key = {}
    for key, value in data.items():
        if key not in specs:
            by_key[key] = "unknown field"
        elif (error := validate_field(specs[key], value)) is not None:
            by_key[key] = error
    for name, field in specs.items():
        if field.get("required") and data.get(name) is None:
            by_key[name] = "required field missing"
    errors = [f"{path}{key}: {error}" for key, error in by_key.items()]
    for check in record.get("entity_checks", []):
        errors += [f"{path}@entity: {e}" for e in _entity_check(check, data)]
    return errors


def _validator_ok(match: dict, value: Any) -> bool:
    rules = {k: v for k, v in match.items() if k != "required"}
    return validate_field({"type": _type_of(value), **rules}, value) is None


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "map"
    return "number"


def _entity_check(check: dict, data: dict) -> list[str]:
    """init.lua Schema.entity_checkers, for the checks a plugin config may use."""
    (name, arg), = check.items()
    if name == "at_least_one_of":
        return [] if any(_is_nonempty(data.get(f)) for f in arg) else [
            f"at least one of these fields must be non-empty: {_quoted(arg)}"]
    if name == "only_one_of":
        return [] if sum(_is_nonempty(data.get(f)) for f in arg) == 1 else [
            f"exactly one of these fields must be non-empty: {_quoted(arg)}"]
    if name == "mutually_required":
        n = sum(_is_nonempty(data.get(f)) for f in arg)
        return [] if n in (0, len(arg)) else [f"all or none of these fields must be set: {_quoted(arg)}"]
    if name == "mutually_exclusive":
        return [] if sum(_is_nonempty(data.get(f)) for f in arg) <= 1 else [
            f"only one or none of these fields must be set: {_quoted(arg)}"]
    if name == "conditional_at_least_one_of":
        if data.get(arg["if_field"]) is not None and _validator_ok(arg["if_match"], data[arg["if_field"]]):
            fields = arg["then_at_least_one_of"]
            if not any(_is_nonempty(data.get(f)) for f in fields):
                return [arg.get("then_err") or f"at least one of these fields must be non-empty: {_quoted(fields)}"]
        return []
    if name == "conditional":
        if data.get(arg["if_field"]) is not None and _validator_ok(arg["if_match"], data[arg["if_field"]]):
            value = data.get(arg["then_field"])
            if value is None:
                return [arg.get("then_err") or f"{arg['then_field']}: required field missing"] \
                    if arg["then_match"].get("required") else []
            if not _validator_ok(arg["then_match"], value):
                return [arg.get("then_err") or f"failed conditional validation given value of field '{arg['if_field']}'"]
        return []
    return [f"entity check {name} is not interpreted by this checker"]


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


# --- the schema itself: kong/db/schema/metaschema.lua MetaSubSchema ------------------------

def _attribute_value_error(attr: str, kind: str, value: Any) -> str | None:
    """The type metaschema.lua gives each attribute (field_schema, validators)."""
    if kind == "boolean" and not isinstance(value, bool):
        return "expected a boolean"
    if kind == "string" and not isinstance(value, str):
        return "expected a string"
    if kind == "integer" and not (_is_number(value) and value == int(value)):
        return "expected an integer"
    if kind == "number" and not _is_number(value):
        return "expected a number"
    if kind == "array" and not isinstance(value, list):
        return "expected an array"
    if kind == "number_pair" and not (isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))):
        return "expected an array of 2 numbers"  # between: array of numbers, len_eq = 2
    if kind == "description":  # { type = "string", len_min = 10, len_max = 500 }
        return validate_field({"type": "string", "len_min": 10, "len_max": 500}, value)
    if kind == "on_delete" and value not in ("restrict", "cascade", "null"):
        return "expected one of: restrict, cascade, null"
    if kind == "function":
        return "a function cannot come from a plugin server's JSON"
    return None


def field_errors(name: str, field: Any, path: str = "") -> list[str]:
    """One field definition against metaschema.lua: its attributes (field_schema, validated as a
    record: an unknown attribute is an error), check_field (type, required_attributes,
    attribute_types, nested elements/keys/values, a record's fields), field_entity_checks,
    and its `default` validated against the field itself (`default = { type = "self" }`)."""
    where = f"{path}{name}"
    if not isinstance(field, dict):
        return [f"{where}: '{name}' must be a table"]  # meta_errors.TABLE
    if not field:
        return [f"{where}: field entry table is empty"]
    errors = []
    kind = field.get("type")
    if kind is None:
        return [f"{where}: missing type declaration"]  # meta_errors.TYPE
    if kind not in VALID_TYPES:
        errors.append(f"{where}.type: expected one of: {', '.join(sorted(VALID_TYPES))}")
    for attr, value in field.items():
        spec = VALIDATOR_ATTRIBUTES.get(attr) or OTHER_ATTRIBUTES.get(attr)
        if spec is None:
            errors.append(f"{where}.{attr}: unknown field")  # init.lua validate_fields UNKNOWN
            continue
        if (error := _attribute_value_error(attr, spec, value)) is not None:
            errors.append(f"{where}.{attr}: {error}")
        if attr in ATTRIBUTE_TYPES and kind not in ATTRIBUTE_TYPES[attr]:
            errors.append(f"{where}: field of type '{kind}' cannot have attribute '{attr}'")
    for attr in REQUIRED_ATTRIBUTES.get(kind, []):
        if attr not in field and not (kind == "record" and field.get("abstract")):
            errors.append(f"{where}: field of type '{kind}' must declare '{attr}'")
    if field.get("unique_across_ws") and not field.get("unique"):  # field_entity_checks
        errors.append(f"{where}: unique_across_ws needs unique")
    for attr in ("elements", "keys", "values"):
        if attr in field:
            errors += field_errors(attr, field[attr], f"{where}.")
    if isinstance(field.get("fields"), list):
        errors += fields_errors(field["fields"], f"{where}.")
        errors += entity_checks_errors(field, f"{where}.")
    if "default" in field and not errors:
        # `default = { type = "self" }`: init.lua validate_fields runs validate_field(field, default)
        if (error := validate_field(field, field["default"])) is not None:
            errors.append(f"{where}.default: {error}")
    # Not a metaschema error: Kong accepts `referenceable` on any field, but resolves references
    # only in strings and in arrays, sets and maps of strings (init.lua process_auto_fields); on
    # anything else a "{vault://...}" would reach the plugin as it was written.
    if field.get("referenceable") and kind != "string":
        errors.append(f"{where}: referenceable has no effect on a {kind} (init.lua process_auto_fields)")
    return errors


def fields_errors(fields: Any, path: str = "") -> list[str]:
    """metaschema.lua fields_array: an array of one-key maps; check_fields on each entry."""
    if not isinstance(fields, list):
        return [f"{path}fields: expected an array"]
    errors = []
    for i, item in enumerate(fields):
        if not isinstance(item, dict):
            errors.append(f"{path}fields[{i + 1}]: each entry in fields must be a sub-table")
        elif len(item) != 1:
            errors.append(f"{path}fields[{i + 1}]: length must be 1")  # len_eq = 1
        else:
            (name, field), = item.items()
            errors += field_errors(name, field, path)
    return errors


def entity_checks_errors(record: dict, path: str = "") -> list[str]:
    """metaschema.lua entity_checks_schema: each check is one known checker."""
    checks = record.get("entity_checks", [])
    if not isinstance(checks, list):
        return [f"{path}entity_checks: expected an array"]
    errors = []
    names = {name for name, _ in _fields(record)}
    for i, check in enumerate(checks):
        if not isinstance(check, dict) or len(check) != 1 or next(iter(check)) not in ENTITY_CHECKERS:
            errors.append(f"{path}entity_checks[{i + 1}]: exactly one of {sorted(ENTITY_CHECKERS)}")
            continue
        (kind, arg), = check.items()
        if kind == "conditional_at_least_one_of":
            allowed = {"if_field", "if_match", "then_at_least_one_of", "then_err", "else_match",
                       "else_then_at_least_one_of", "else_then_err"}
            if not isinstance(arg, dict) or set(arg) - allowed:
                errors.append(f"{path}entity_checks[{i + 1}]: unknown field in {kind}")
                continue
            named = [arg.get("if_field"), *arg.get("then_at_least_one_of", [])]
        elif kind == "conditional":
            named = [arg.get("if_field"), arg.get("then_field")]
        elif isinstance(arg, list):
            named = arg
        else:
            named = []
        # init.lua run_entity_check reads the named fields: one the record lacks is always empty
        errors += [f"{path}entity_checks[{i + 1}]: no field {n!r}" for n in named if n not in names]
    return errors


def schema_errors(schema: Any) -> list[str]:
    """What Kong's plugin loader finds wrong with a plugin server's `Schema` (empty: accepted)."""
    if not isinstance(schema, dict):
        return ["schema: expected a record"]
    errors = [f"{key}: unknown field" for key in schema if key not in SUBSCHEMA_KEYS]
    if not isinstance(schema.get("name"), str) or not schema.get("name"):
        errors.append("name: required field missing")
    if "fields" not in schema:
        return errors + ["fields: 'fields' must be a table"]
    errors += fields_errors(schema["fields"])
    errors += entity_checks_errors(schema)
    for name, field in _fields(schema) if isinstance(schema["fields"], list) else []:
        # init.lua Schema.new_subschema: only the plugin entity's fields, with their types
        if name not in PLUGIN_ENTITY_FIELDS:
            errors.append(f"error in definition of '{schema.get('name')}': {name}: cannot create a new field")
        elif (isinstance(field, dict) and field.get("type") != PLUGIN_ENTITY_FIELDS[name]
              or name in ("protocols", "tags") and field.get("elements", {}).get("type") != "string"):
            errors.append(f"error in definition of '{schema.get('name')}': {name}: "
                          "cannot change type in a specialized field")
    return errors


def plugin_record(schema: dict) -> dict:
    """The plugin entity as Kong sees it with this subschema: the `config` record made required
    (kong/db/schema/entity.lua Entity.new_subschema make_records_required)."""
    fields = dict(_fields(schema))
    config = dict(fields.get("config", {"type": "record", "fields": []}), required=True)
    protocols = fields.get("protocols") or {"type": "set", "required": True, "elements": {
        "type": "string", "one_of": sorted(KONG_PROTOCOLS)}}
    return {"type": "record", "fields": [{"config": config}, {"protocols": protocols}]}


def config_errors(schema: dict, config: Any, protocols: Any = None) -> list[str]:
    """What Kong finds wrong with a pgwshard plugin entity's `config` (and `protocols`, if given)."""
    record = plugin_record(schema)
    entity = {"config": config} if protocols is None else {"config": config, "protocols": protocols}
    data = _with_defaults(record, entity)
    if isinstance(data.get("config"), dict):
        (config_field,) = [f for n, f in _fields(record) if n == "config"]
        data["config"] = _with_defaults(config_field, data["config"])
        errors = _record_errors(config_field, data["config"], "config.")
        rest = {k: v for k, v in data.items() if k != "config"}
        return errors + _record_errors({"fields": [i for i in record["fields"] if "config" not in i]}, rest, "")
    return _record_errors(record, data, "")

