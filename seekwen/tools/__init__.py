"""Tools on top of the engine: generate, chat, train, bench, trace, memory, rope, routes, context."""
