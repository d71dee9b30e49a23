"""Wire messages: typed msgspec Structs for every frame, and their decoders/encoders."""
