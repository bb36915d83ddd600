"""Writes tessera.yaml manifests (version 1) with a fixed key order."""
import json

SCHEDULE_DEFAULT = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}

ORDER = ["version", "kind", "prediction", "inputs", "outputs", "lowres_concat", "channels",
         "native_size", "scale", "size_multiple", "receptive_field", "classes", "null_class",
         "schedule", "defaults", "description", "license"]
SCHED_ORDER = ["num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
               "timestep_spacing", "steps_offset"]
DEF_ORDER = ["steps", "sampler", "guidance", "strength", "noise_level"]


def _scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid YAML double-quoted scalar
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return repr(v)


def render(m):
    unknown = set(m) - set(ORDER)
    if unknown:
        raise ValueError(f"unknown manifest keys {unknown}")
    lines = []
    for k in ORDER:
        if k not in m:
            continue
        v = m[k]
        if k in ("inputs", "outputs"):
            lines.append(f"{k}:")
            for role, name in v.items():
                lines.append(f"  {role}: {name}")
        elif k in ("schedule", "defaults"):
            order = SCHED_ORDER if k == "schedule" else DEF_ORDER
            extra = set(v) - set(order)
            if extra:
                raise ValueError(f"unknown {k} keys {extra}")
            lines.append(f"{k}:")
            for kk in order:
                if kk in v:
                    lines.append(f"  {kk}: {_scalar(v[kk])}")
        else:
            lines.append(f"{k}: {_scalar(v)}")
    return "\n".join(lines) + "\n"


def write(path, m):
    with open(path, "w") as f:
        f.write(render(m))
