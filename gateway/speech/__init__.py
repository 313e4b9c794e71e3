"""Speech out: what the gateway says into the meeting through the bot.

control (the control socket: say, play, stop), voice (piper TTS, WAV decoding), speech_out
(a session's speaking half), playback (the asyncio player) over playlist, pacing and
bargein (sans I/O).
"""
