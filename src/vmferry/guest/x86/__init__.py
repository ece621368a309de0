"""Real x86-64 guest programs: assembly source (``*.s``) and the small assembler that turns
it into bytes (:mod:`.asm`); :mod:`.program` lays a program out in guest memory."""
