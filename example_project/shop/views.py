"""Edit GREETING (or templates/shop/hello.html) while the server runs to see a reload."""

from django.http import HttpResponse
from django.shortcuts import render

from .models import Item

GREETING = "hello"


def hello(request):
    return render(request, "shop/hello.html", {"greeting": GREETING})


def items(request):
    if not Item.objects.exists():
        Item.objects.create(name="teapot")
    return HttpResponse(", ".join(item.name for item in Item.objects.order_by("name")), content_type="text/plain")
