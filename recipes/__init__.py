"""Built-in recipes: one file per data set, each defining `recipe = Recipe(...)`. Installed as fastcls._recipes."""
