"""One module per pipeline stage; each has main(argv) and runs under torchrun or plain python."""
