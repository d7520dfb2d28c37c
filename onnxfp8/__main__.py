from onnxfp8.cli import main

main()
