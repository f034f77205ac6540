class HyperParams:
    @classmethod
    def construct_float_from_scientific_notation(cls, config: dict) -> dict:
        out = {}
        for key, value in config.items():
            try:
                out[key] = float(value) if isinstance(value, str) and "e" in value.lower() else value
            except ValueError:
                out[key] = value
        return out
