"""The systems tokenrelay is measured against, all speaking one small HTTP shape.

``POST /streams/{id}?<pace>`` starts a stream and returns it to this client;
``POST /streams/{id}/background?<pace>`` starts it and answers 202;
``GET /streams/{id}`` joins it (``Last-Event-ID`` resumes; resumable-stream takes ``?skip=``).
"""
