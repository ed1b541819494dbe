"""Message schemas of fedimg and autocloud_ami (fedora-messaging ``fedora.messages``).

``fedimg_messages.schemas``: the JSON schemas, plain data (standard library only).
``fedimg_messages.messages``: one ``fedora_messaging.message.Message`` subclass per topic.
"""
