"""The SIP phone bridge: a small asyncio SIP user agent and RTP stack (one module per concern).

`message` (SIP parsing and building), `sdp` (offer/answer), `digest` (authentication),
`g711` (codecs), `rtp` (packets, jitter buffer, DTMF events, the media session),
`transaction` (retransmissions), `ua` (dialogs, calls, registration) and `bridge` (a call
as an AgentSession's audio input and output).
"""
