"""The test suite.

moto in process is taught, before any test module runs, exactly the calls it
lacks of those fedimg makes (``devel.motoextra``: image deprecation, image
block public access, the public-AMI quota); the devel ``moto_server`` has the
same. Everything else is moto's own.

botocore's sessions share their parsed service models and client classes
(``tests.botocache``): the tests make a session per test, production one per
process.
"""

from devel import motoextra
from tests import botocache

motoextra.install()
botocache.install()
