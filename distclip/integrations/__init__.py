"""distclip inside the trainers users already run: one small module per framework.

Each module imports its framework only when used, so ``import distclip`` never needs it:
``distclip.integrations.lightning``, ``distclip.integrations.accelerate``,
``distclip.integrations.torchtitan``.  Install the tested versions with
``pip install "distclip[integrations]"``.
"""
