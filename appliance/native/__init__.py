"""Native code the appliance loads (llama.cpp, CTranslate2, onnxruntime, PortAudio): how
it is built for this CPU and how it is checked before it matters."""
