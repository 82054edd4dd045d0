"""The one config mechanism of vqcore's model classes (autoencoders, transformer, scheduler).

A model's constructor takes diffusers' config fields by keyword, with diffusers' defaults; `model.config` is the dict
of them as the model was built (tuples as lists, as in a config.json), so `cls.from_config(model.config)` rebuilds
it, and `cls.from_config(diffusers_config)` builds from a diffusers config dict.
"""

import inspect


class Configured:
    @classmethod
    def config_fields(cls):
        """The constructor's parameter names: the config fields the class takes."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def config_kwargs(cls, config):
        """The fields of a diffusers config dict that the class takes; "_"-keys and other keys are ignored (a key
        that changes the architecture shows up as missing or unexpected weights when loading)."""
        fields = cls.config_fields()
        return {key: value for key, value in config.items() if key in fields}

    @classmethod
    def from_config(cls, config):
        return cls(**cls.config_kwargs(config))

    def keep_config(self, arguments):
        """Sets self.config from the constructor's locals()."""
        self.config = {name: list(arguments[name]) if isinstance(arguments[name], tuple) else arguments[name]
                       for name in self.config_fields()}
