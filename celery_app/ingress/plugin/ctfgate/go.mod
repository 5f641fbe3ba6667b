module ctf-instancer/ctfgate

go 1.22
